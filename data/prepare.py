"""Turn a corpus into tokenizer + packed token arrays, cached by content.

The skeleton's minimal version of the data pipeline (the data issue replaces the arrays
with sharded, headered, memory-mapped files and multi-worker preparation): documents are
read, split into train/validation by a seeded draw, tokenized, and each followed by the
EOS token; the two token streams are saved as .npy files beside a meta.json that records
the cache key (corpus hash, tokenizer hash, split settings). A second run with the same
inputs reuses them; any change rebuilds. Files are written to temporary names and renamed,
so an interrupted preparation never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import DataConfig
from .corpus import read_documents, resolve_corpus
from .tokenizer import Tokenizer, train_tokenizer


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train_path: Path
    val_path: Path
    meta: dict

    def load(self, split: str) -> np.ndarray:
        return np.load(self.train_path if split == "train" else self.val_path, mmap_mode="r")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _split_is_val(n_docs: int, fraction: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n_docs) < fraction


def prepare(cfg: DataConfig, work_dir: str | Path, show_progress: bool = True) -> PreparedData:
    """Build (or reuse) the tokenizer and token arrays under ``work_dir``. Single process:
    the launcher runs it on rank 0 and the other ranks wait at a barrier, then ``open``."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = resolve_corpus(cfg.corpus)
    corpus_hash = _sha256(corpus)

    docs = list(read_documents(corpus, cfg.text_field))
    empty = sum(1 for d in docs if not d.strip())
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data.corpus: {corpus} holds no non-empty document")

    if cfg.tokenizer:
        tok = Tokenizer(cfg.tokenizer)
    else:
        spec = f"{corpus_hash}:{cfg.tokenizer_type}:{cfg.vocab_size}:{cfg.text_field}"
        tok_path = work_dir / f"tokenizer-{hashlib.sha256(spec.encode()).hexdigest()[:12]}.model"
        if tok_path.is_file():
            tok = Tokenizer(tok_path)
        else:
            tok = train_tokenizer(docs, tok_path, cfg.vocab_size, cfg.tokenizer_type)

    key = {
        "corpus_sha256": corpus_hash,
        "tokenizer_sha256": tok.sha256,
        "text_field": cfg.text_field,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }
    meta_path = work_dir / "tokens.meta.json"
    train_path, val_path = work_dir / "train.npy", work_dir / "val.npy"
    if meta_path.is_file() and train_path.is_file() and val_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return PreparedData(tok, train_path, val_path, meta)

    is_val = _split_is_val(len(docs), cfg.val_fraction, cfg.seed)
    streams: dict[bool, list[int]] = {False: [], True: []}
    for doc, val in zip(
        tqdm(docs, desc="tokenizing", unit="doc", disable=not show_progress), is_val
    ):
        streams[bool(val)].extend(tok.encode(doc))
        streams[bool(val)].append(tok.eos_id)
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.int32
    meta_path.unlink(missing_ok=True)  # the meta file is the completion marker: written last
    _save_npy(train_path, np.asarray(streams[False], dtype=dtype))
    _save_npy(val_path, np.asarray(streams[True], dtype=dtype))
    meta = {
        "key": key,
        "documents": {
            "train": int((~is_val).sum()),
            "val": int(is_val.sum()),
            "empty_dropped": empty,
        },
        "tokens": {"train": len(streams[False]), "val": len(streams[True])},
        "vocab_size": tok.vocab_size,
        "tokenizer": str(tok.path),
    }
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)
    return PreparedData(tok, train_path, val_path, meta)
