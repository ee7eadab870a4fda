"""sentencepiece tokenizers: train on a corpus sample, or load an existing model."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from plait.errors import UserError

MAX_SENTENCE_BYTES = 4192
"""sentencepiece's trainer skips, silently, every training sentence longer than this (its
``max_sentence_length``); ``training_pieces`` cuts longer documents to fit."""


class TokenizerError(UserError):
    """A tokenizer file that cannot be used, or a corpus a tokenizer cannot be trained on;
    the message names the file (callers add the field that named it)."""


class Tokenizer:
    """A thin wrapper that also knows its file's hash (stored beside the tokens it made)."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        blob = self.path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(blob)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({e})") from None
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{self.path} defines no end-of-document (eos) token")

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
        raise TokenizerError(
            f"data.prepare.vocab_size={vocab_size}: sentencepiece training failed: {e}"
        ) from None
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)


def training_pieces(text: str, limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    """``text`` as training sentences of at most ``limit`` UTF-8 bytes: itself when it fits,
    else cut at whitespace (a run of more than ``limit`` bytes without whitespace is cut
    anywhere). sentencepiece would otherwise drop the whole document: a corpus of books
    trained its tokenizer on none of them, and one long line left nothing to train on."""
    if len(text.encode()) <= limit:
        return [text]
    pieces, current, size = [], [], 0
    for word in text.split():
        n = len(word.encode()) + 1
        while n - 1 > limit:  # no whitespace for longer than a sentence: cut by characters
            head = word[: limit // 4]
            pieces.append(head)
            word = word[len(head) :]
            n = len(word.encode()) + 1
        if size + n > limit and current:
            pieces.append(" ".join(current))
            current, size = [], 0
        current.append(word)
        size += n
    if current:
        pieces.append(" ".join(current))
    return pieces


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
