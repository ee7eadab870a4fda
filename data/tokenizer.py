"""sentencepiece tokenizers: train on a corpus sample, or load an existing model."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    """A thin wrapper that also knows its file's hash (stored beside the tokens it made)."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data.prepare.tokenizer: {self.path} does not exist")
        blob = self.path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=blob)
        if self.sp.eos_id() < 0:
            raise ValueError(
                f"data.prepare.tokenizer: {self.path} defines no end-of-document (eos) token"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def train_tokenizer(
    texts: Iterable[str],
    out_path: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    user_symbols: tuple[str, ...] = (),
) -> Tokenizer:
    """Train with byte fallback (no token is ever unknown) and write ``out_path`` atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        _train(texts, buf, vocab_size, model_type, user_symbols)
    except RuntimeError as e:
        raise ValueError(
            f"data.prepare.vocab_size={vocab_size}: sentencepiece training failed: {e}"
        ) from None
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def _train(texts, buf, vocab_size, model_type, user_symbols) -> None:
    # byte_fallback reserves 256 byte pieces on top of the characters seen.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of an error
        character_coverage=1.0,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=list(user_symbols),
        num_threads=1,
        minloglevel=2,
    )
