"""Tokenizers: sentencepiece models (trained on a corpus sample, or given) and HF
``tokenizers`` files (tokenizer.json, as released checkpoints ship them: Qwen3.5's).

A prepared dataset keeps its tokenizer as ``tokenizer.model`` (sentencepiece) or
``tokenizer.json`` (HF); ``tokenizer_in`` finds it. Both kinds are known by their content,
not their name, and both end every document with one end-of-document token: sentencepiece's
eos, or in a tokenizer.json the first of ``DOCUMENT_SEPARATORS`` it defines (Qwen's
pretraining separator is ``<|endoftext|>``)."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import sentencepiece as spm

from plait.errors import UserError

MAX_SENTENCE_BYTES = 4192
"""sentencepiece's trainer skips, silently, every training sentence longer than this (its
``max_sentence_length``); ``training_pieces`` cuts longer documents to fit."""


class TokenizerError(UserError):
    """A tokenizer file that cannot be used, or a corpus a tokenizer cannot be trained on;
    the message names the file (callers add the field that named it)."""


FILES = ("tokenizer.model", "tokenizer.json")
"""The names a prepared dataset (or an imported checkpoint) keeps its tokenizer under."""

DOCUMENT_SEPARATORS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""The tokens a tokenizer.json's documents end with, the first one it defines."""


def tokenizer_in(directory: str | Path) -> Path:
    """The tokenizer file of a prepared dataset or checkpoint directory (``tokenizer.model``
    when neither exists, so that the error names the usual file)."""
    for name in FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return Path(directory) / FILES[0]


def is_json(blob: bytes) -> bool:
    return blob.lstrip()[:1] == b"{"


class Tokenizer:
    """A thin wrapper over either kind that also knows its file's hash (stored beside the
    tokens it made)."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"{self.path}: no such tokenizer file")
        blob = self.path.read_bytes()
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.sp = self.hf = None
        if is_json(blob):
            self.hf, self._eos = _load_json(blob, self.path)
            return
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(blob)
        except (RuntimeError, OSError) as e:
            raise TokenizerError(
                f"{self.path}: not a sentencepiece model ({e}), nor a tokenizer.json"
            ) from None
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{self.path} defines no end-of-document (eos) token")
        self._eos = self.sp.eos_id()

    @property
    def kind(self) -> str:
        """"sentencepiece" or "tokenizers"."""
        return "tokenizers" if self.hf is not None else "sentencepiece"

    @property
    def file_name(self) -> str:
        """What a prepared dataset calls this tokenizer's file."""
        return FILES[1] if self.hf is not None else FILES[0]

    @property
    def vocab_size(self) -> int:
        if self.hf is not None:
            return self.hf.get_vocab_size(with_added_tokens=True)
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def eos_token(self) -> str:
        return self.hf.id_to_token(self._eos) if self.hf is not None else self.sp.id_to_piece(
            self._eos)

    def encode(self, text: str) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False).ids
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.sp.decode(ids)


def _load_json(blob: bytes, where: Path):
    """An HF tokenizers file and its document separator's id."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tk = HFTokenizer.from_str(blob.decode())
    except Exception as e:  # tokenizers raises its own Exception for a malformed file
        raise TokenizerError(
            f"{where}: not a sentencepiece model, nor a valid tokenizer.json ({e})"
        ) from None
    for token in DOCUMENT_SEPARATORS:
        tid = tk.token_to_id(token)
        if tid is not None:
            return tk, tid
    raise TokenizerError(
        f"{where} defines no end-of-document token (looked for {', '.join(DOCUMENT_SEPARATORS)})"
    )


def batch_encoder(blob: bytes, threads: int = -1) -> Callable[[list[str]], list[list[int]]]:
    """A function encoding a batch of texts with the tokenizer file's bytes ``blob`` (for the
    preparation's worker processes): sentencepiece's own batch encoder on ``threads`` threads
    (-1: all), or tokenizers' ``encode_batch`` (its thread pool; one worker process keeps it)."""
    if is_json(blob):
        from tokenizers import Tokenizer as HFTokenizer

        tk = HFTokenizer.from_str(blob.decode())
        return lambda texts: [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]
    sp = spm.SentencePieceProcessor(model_proto=blob)
    return lambda texts: sp.encode(texts, num_threads=threads)


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
