"""Typed data configuration of a training run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from plait.errors import UserError


class DataConfigError(UserError, ValueError):
    """A data field is invalid; the message names the field."""


@dataclass
class PrepareOptions:
    """How a corpus becomes a prepared dataset (tokenizer, shards, train/validation split).

    One definition for both paths: ``python -m plait.data.prepare`` (``PrepareConfig`` adds
    the source and output) and a training run's automatic preparation (``data.prepare.*``),
    so the two split the same corpus the same way.
    """

    text_field: str = "text"
    """The field of each record that holds its text."""
    tokenizer: str = ""
    """An existing sentencepiece .model; empty: train one on a sample of the corpus."""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2048
    """Vocabulary of a trained tokenizer."""
    special_tokens: list[str] = field(default_factory=list)
    """User-defined symbols added to a trained tokenizer."""
    tokenizer_sample_docs: int = 200_000
    """Non-empty documents the tokenizer is trained on (the first ones)."""
    workers: int = 1
    """Tokenizer processes."""
    docs_per_shard: int = 10_000
    """Records per chunk; chunk c becomes shard c of each split."""
    val_fraction: float = 0.01
    """Fraction of documents held out for validation (a draw per document, seeded by
    (seed, chunk))."""
    seed: int = 1234
    """Seed of the train/validation split."""
    on_decode_error: Literal["error", "replace"] = "error"
    """Undecodable bytes in the corpus: stop with file:line, or replace them and count."""

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise DataConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.vocab_size < 64:
            raise DataConfigError(f"vocab_size: must be >= 64, got {self.vocab_size}")
        if not self.text_field:
            raise DataConfigError("text_field: must not be empty")
        for name in ("workers", "docs_per_shard", "tokenizer_sample_docs"):
            if getattr(self, name) < 1:
                raise DataConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=list)
    """Prepared dataset directories (``python -m plait.data.prepare``) to train on; empty means
    prepare ``corpus`` into <out_dir>/data first (rank 0, reused when unchanged)."""
    weights: list[float] = field(default_factory=list)
    """Blend weights, one per dataset (default: equal)."""
    corpus: str = ""
    """Source for the automatic preparation: a file, a directory or hf:NAME; empty means the
    bundled corpus (Bierce's "The Devil's Dictionary", public domain: data/corpus/README.md)."""
    prepare: PrepareOptions = field(default_factory=PrepareOptions)
    """How the automatic preparation tokenizes and splits ``corpus`` (the options of
    ``python -m plait.data.prepare``, same defaults)."""
    seq_len: int = 128
    """Tokens per training sequence (documents are packed, separated by EOS)."""
    seed: int = 1234
    """Seed of the per-epoch sample order and of the blend (the split's is prepare.seed)."""
    document_masking: bool = True
    """Hand document boundaries to the model: linear layers reset their state, attention is
    masked, and positions restart at every document."""
    warmup_seq_len: int = 0
    """Sequence-length warmup: start at this length (0: off), doubling up to seq_len..."""
    warmup_seq_len_steps: int = 0
    """...over this many optimizer steps (tokens per step stay constant)."""

    def validate(self) -> None:
        if self.seq_len < 1:
            raise DataConfigError(f"seq_len: must be >= 1, got {self.seq_len}")
        try:
            self.prepare.validate()
        except DataConfigError as e:
            raise DataConfigError(f"prepare.{e}") from None
        if self.weights and len(self.weights) != len(self.datasets):
            raise DataConfigError(
                f"weights: {len(self.weights)} weights for {len(self.datasets)} datasets"
            )
        if any(w < 0 for w in self.weights):
            raise DataConfigError(f"weights: must be >= 0, got {self.weights}")
        if self.warmup_seq_len:
            ratio = self.seq_len // self.warmup_seq_len
            if self.seq_len % self.warmup_seq_len or ratio & (ratio - 1):
                raise DataConfigError(
                    f"warmup_seq_len: {self.warmup_seq_len} must be seq_len {self.seq_len} "
                    "divided by a power of two"
                )
