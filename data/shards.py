"""Memory-mapped token shards: one file per shard, with a header that makes bad files loud.

Layout (little-endian):
    header, 128 bytes:  magic b"PLAITSHD" | version u32 | dtype code u32 | n_tokens u64 |
                        n_docs u64 | tokenizer sha256 (32 raw bytes) | zero padding
    document index:     (n_docs + 1) u64 token offsets, starting at 0, ending at n_tokens
    tokens:             n_tokens of uint16 (vocabularies < 65536) or uint32

A shard is written to ``<name>.tmp``, flushed, fsynced and renamed: a file with the final
name is always complete, and the size implied by the header is checked on open, so a
truncated copy, a foreign file, another version or a mismatched tokenizer is an error that
names the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plait.errors import UserError

MAGIC = b"PLAITSHD"
VERSION = 1
HEADER_SIZE = 128
_HEADER = struct.Struct("<8sIIQQ32s")
_DTYPES = {1: np.uint16, 2: np.uint32}
_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}


class ShardError(UserError, ValueError):
    """A shard file is unusable; the message names the file and what is wrong."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    dtype: np.dtype
    n_tokens: int
    n_docs: int
    tokenizer_sha256: str

    @property
    def file_size(self) -> int:
        return HEADER_SIZE + 8 * (self.n_docs + 1) + self.n_tokens * self.dtype.itemsize


def write_shard(
    path: str | Path, docs: list[np.ndarray], tokenizer_sha256: str, dtype: np.dtype
) -> ShardHeader:
    """Write the documents (token arrays, EOS already appended) as one shard, atomically."""
    path = Path(path)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.uint64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.uint64)
    np.cumsum(lengths, out=offsets[1:])
    header = ShardHeader(np.dtype(dtype), int(offsets[-1]), len(docs), tokenizer_sha256)
    raw = _HEADER.pack(
        MAGIC, VERSION, _CODES[header.dtype], header.n_tokens, header.n_docs,
        bytes.fromhex(tokenizer_sha256),
    )
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(raw.ljust(HEADER_SIZE, b"\0"))
        f.write(offsets.astype("<u8").tobytes())
        for d in docs:
            f.write(
                np.asarray(d, dtype=header.dtype).astype(header.dtype.newbyteorder("<")).tobytes()
            )
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return header


def read_header(path: str | Path) -> ShardHeader:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e.strerror})") from None
    if len(raw) < _HEADER.size or raw[:8] != MAGIC:
        raise ShardError(f"{path}: not a plait shard (bad magic {raw[:8]!r})")
    _, version, code, n_tokens, n_docs, sha = _HEADER.unpack(raw[: _HEADER.size])
    if version != VERSION:
        raise ShardError(f"{path}: shard format version {version}, this plait reads {VERSION}")
    if code not in _DTYPES:
        raise ShardError(f"{path}: unknown token dtype code {code}")
    header = ShardHeader(np.dtype(_DTYPES[code]), n_tokens, n_docs, sha.hex())
    if size != header.file_size:
        raise ShardError(
            f"{path}: size {size} bytes, header says {header.file_size} "
            f"({n_tokens} tokens, {n_docs} documents): truncated or corrupted"
        )
    return header


class Shard:
    """A validated, memory-mapped shard: ``tokens`` and document ``offsets``."""

    def __init__(self, path: str | Path, expect_tokenizer: str | None = None):
        self.path = Path(path)
        self.header = read_header(self.path)
        if expect_tokenizer is not None and self.header.tokenizer_sha256 != expect_tokenizer:
            raise ShardError(
                f"{self.path}: tokenized with tokenizer {self.header.tokenizer_sha256[:12]}..., "
                f"but the run uses {expect_tokenizer[:12]}...: re-prepare or use that tokenizer"
            )
        h = self.header
        self.offsets = np.memmap(
            self.path, dtype="<u8", mode="r", offset=HEADER_SIZE, shape=(h.n_docs + 1,)
        )
        self.tokens = np.memmap(
            self.path, dtype=h.dtype.newbyteorder("<"), mode="r",
            offset=HEADER_SIZE + 8 * (h.n_docs + 1), shape=(h.n_tokens,),
        )
        if h.n_docs and (int(self.offsets[0]) != 0 or int(self.offsets[-1]) != h.n_tokens):
            raise ShardError(f"{self.path}: document index does not span the tokens")

    def __len__(self) -> int:
        return self.header.n_tokens
