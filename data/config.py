"""Typed data configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class DataConfigError(ValueError):
    """A data field is invalid; the message names the field."""


@dataclass
class DataConfig:
    corpus: str = ""
    """A JSON-lines file with one document per line; empty means the bundled corpus
    (Bierce's "The Devil's Dictionary", public domain: data/corpus/README.md)."""
    text_field: str = "text"
    """The JSON key that holds each document's text."""
    tokenizer: str = ""
    """An existing sentencepiece .model to use; empty means train one on the corpus."""
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 2048
    """Vocabulary of a tokenizer trained here."""
    seq_len: int = 128
    """Tokens per training sequence (documents are packed, separated by the EOS token)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation (chosen by a seeded draw)."""
    seed: int = 1234
    """Seed of the document split and of the per-epoch sample order."""

    def validate(self) -> None:
        if self.seq_len < 1:
            raise DataConfigError(f"seq_len: must be >= 1, got {self.seq_len}")
        if not 0 <= self.val_fraction < 1:
            raise DataConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.vocab_size < 64:
            raise DataConfigError(f"vocab_size: must be >= 64, got {self.vocab_size}")
        if not self.text_field:
            raise DataConfigError("text_field: must not be empty")
