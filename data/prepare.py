"""Preparation: corpus -> tokenizer -> tokenized, sharded, memory-mapped datasets.

    python -m plait.data.prepare --source docs/ --out runs/data/c --vocab-size 32000 --workers 8

Writes ``<out>/tokenizer.model`` (trained on the first ``tokenizer_sample_docs`` non-empty
documents), or the given tokenizer (``--tokenizer``: a sentencepiece model, or an HF
tokenizer.json such as a released checkpoint's, kept as ``<out>/tokenizer.json``),
``<out>/train/shard-NNNNN.bin`` and ``<out>/val/shard-NNNNN.bin`` (see shards.py), and
``<out>/manifest.json``.

Determinism and resume: the input is read in chunks of ``docs_per_shard`` records; chunk c
becomes shard c of each split, every document going to validation by a draw seeded with
(seed, c). The manifest is rewritten atomically after every finished chunk and lists the
finished shards, so an interrupted preparation restarted with the same settings keeps them,
skips their records, and redoes only the unfinished chunk (whose ``.tmp`` file is never
taken for a shard). Empty documents are dropped and counted; undecodable bytes stop the run
with file:line, or are replaced and counted (``on_decode_error="replace"``).
Tokenization runs in ``workers`` processes (at most two chunks in flight per worker, so
memory stays bounded on corpora larger than memory) with a progress bar.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import typing
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from plait.errors import UserError, run_command

from .config import DataConfigError, PrepareOptions
from .corpus import CorpusError
from .ingest import IngestStats, fingerprint, iter_documents
from .shards import Shard, ShardError, token_dtype, write_shard
from .tokenizer import (
    FILES,
    Tokenizer,
    TokenizerError,
    batch_encoder,
    tokenizer_in,
    train_tokenizer,
    training_pieces,
)

MANIFEST = "manifest.json"


@dataclass(kw_only=True)
class PrepareConfig(PrepareOptions):
    """A preparation: the source, the output and the shared ``PrepareOptions``."""

    source: str
    """A file, a directory, or hf:NAME[:SPLIT]."""
    out: str
    """Output directory."""
    show_progress: bool = True

    def key(self, tokenizer_sha256: str) -> dict:
        """What must match for finished shards to be reused."""
        return {
            "source": fingerprint(self.source),
            "text_field": self.text_field,
            "tokenizer_sha256": tokenizer_sha256,
            "docs_per_shard": self.docs_per_shard,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "on_decode_error": self.on_decode_error,
        }


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _given_tokenizer(cfg: PrepareConfig) -> Tokenizer:
    """The existing model ``cfg.tokenizer`` names, checked (no copy made)."""
    try:
        return Tokenizer(cfg.tokenizer)
    except TokenizerError as e:
        raise TokenizerError(f"tokenizer: {e}") from None


def _tokenizer_spec(cfg: PrepareConfig) -> dict:
    return {
        "source": fingerprint(cfg.source), "type": cfg.tokenizer_type, "vocab": cfg.vocab_size,
        "special": cfg.special_tokens, "sample": cfg.tokenizer_sample_docs,
        "field": cfg.text_field,
    }


def _tokenizer(cfg: PrepareConfig, out: Path) -> Tokenizer:
    if cfg.tokenizer:
        given = _given_tokenizer(cfg)
        dst = out / given.file_name
        if not dst.exists() or dst.read_bytes() != given.path.read_bytes():
            shutil.copyfile(given.path, dst)
        for other in FILES:  # a directory holds one tokenizer
            if other != dst.name:
                (out / other).unlink(missing_ok=True)
        return Tokenizer(dst)
    path = out / "tokenizer.model"
    spec = _tokenizer_spec(cfg)
    spec_path = out / "tokenizer.spec.json"
    if path.exists() and spec_path.exists() and json.loads(spec_path.read_text()) == spec:
        return Tokenizer(path)

    def sample():
        n = 0
        for _, text in iter_documents(cfg.source, cfg.text_field, cfg.on_decode_error):
            if text.strip():
                yield from training_pieces(text)
                n += 1
                if n >= cfg.tokenizer_sample_docs:
                    return

    # Materialised first (sentencepiece holds its sample in memory anyway), so that an input
    # error surfaces as itself rather than wrapped by sentencepiece's trainer.
    texts = list(sample())
    if not texts:
        raise CorpusError(f"data source {cfg.source}: no non-empty document to train a "
                          "tokenizer on (field data.prepare.text_field)")
    tok = train_tokenizer(
        texts, path, cfg.vocab_size, cfg.tokenizer_type, tuple(cfg.special_tokens)
    )
    _write_json_atomic(spec_path, spec)
    return tok


def reusable(cfg: PrepareConfig) -> dict | None:
    """The manifest of ``cfg.out`` when that directory already holds this exact preparation,
    complete (what ``prepare_corpus`` would return without writing anything); else None.
    Reads only: a run checks with it, before writing, whether its data would be rebuilt."""
    out = Path(cfg.out)
    manifest_path, path = out / MANIFEST, tokenizer_in(out)
    if not manifest_path.is_file() or not path.is_file():
        return None
    if cfg.tokenizer:
        if path.read_bytes() != _given_tokenizer(cfg).path.read_bytes():
            return None
    else:
        spec_path = out / "tokenizer.spec.json"
        if not spec_path.is_file() or json.loads(spec_path.read_text()) != _tokenizer_spec(cfg):
            return None
    try:
        manifest = json.loads(manifest_path.read_text())
        sha = Tokenizer(path).sha256
    except (ValueError, TokenizerError):
        return None
    return manifest if manifest.get("complete") and manifest.get("key") == cfg.key(sha) else None


_WORKER_SP = None


def _init_worker(model_bytes: bytes, threads: int = -1) -> None:
    """sentencepiece's batch encoder is itself multi-threaded (all cores by default): a single
    worker keeps that; several worker processes run one thread each, not cores x workers."""
    global _WORKER_SP
    _WORKER_SP = batch_encoder(model_bytes, threads)


def _tokenize(texts: list[str], eos: int, dtype: str) -> list[np.ndarray]:
    ids = _WORKER_SP(texts)
    return [np.asarray([*x, eos], dtype=dtype) for x in ids]


def _chunks(cfg: PrepareConfig, skip_records: int, stats: IngestStats):
    """Yield (chunk index, texts of its non-empty records, empty count) in input order."""
    c, texts, empty, n = skip_records // cfg.docs_per_shard, [], 0, 0
    for i, text in iter_documents(cfg.source, cfg.text_field, cfg.on_decode_error, stats):
        if i < skip_records:
            continue
        if text.strip():
            texts.append(text)
        else:
            empty += 1
        n += 1
        if n == cfg.docs_per_shard:
            yield c, texts, empty, n
            c, texts, empty, n = c + 1, [], 0, 0
    if n:
        yield c, texts, empty, n


def prepare_corpus(cfg: PrepareConfig) -> dict:
    """Run (or resume, or reuse) a preparation; returns the manifest. A refusal (bad input:
    a ``UserError``) of a preparation that created ``cfg.out`` removes it again: its shards
    are keyed by the corpus's fingerprint, which fixing the corpus changes anyway."""
    out = Path(cfg.out)
    created = not out.exists()
    try:
        return _prepare(cfg)
    except UserError:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(cfg: PrepareConfig) -> dict:
    cfg.validate()
    fingerprint(cfg.source)  # a missing source is named before anything is written
    if cfg.tokenizer:
        _given_tokenizer(cfg)
    out = Path(cfg.out)
    try:
        (out / "train").mkdir(parents=True, exist_ok=True)
        (out / "val").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataConfigError(f"out: cannot create {out}: {e.strerror}") from None
    tok = _tokenizer(cfg, out)
    key = cfg.key(tok.sha256)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest and manifest.get("key") == key and manifest.get("complete"):
        return manifest
    if not manifest or manifest.get("key") != key:
        manifest = {
            "format": "plait-shards",
            "version": 1,
            "key": key,
            "chunks": [],
            "complete": False,
        }
    manifest.update(
        tokenizer=tok.path.name, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
    )
    manifest["chunks"] = _verified_prefix(out, manifest["chunks"], tok.sha256)
    done = len(manifest["chunks"])
    dtype = token_dtype(tok.vocab_size)
    stats = IngestStats()
    bar = tqdm(
        desc="preparing",
        unit="doc",
        disable=not cfg.show_progress,
        initial=done * cfg.docs_per_shard,
    )

    def finish(c, docs, empty, n):
        val = np.random.default_rng([cfg.seed, c]).random(len(docs)) < cfg.val_fraction
        entry = {"index": c, "records": [c * cfg.docs_per_shard, c * cfg.docs_per_shard + n],
                 "empty_dropped": empty}
        for split, mask in (("train", ~val), ("val", val)):
            name = f"{split}/shard-{c:05d}.bin"
            h = write_shard(out / name, [d for d, m in zip(docs, mask) if m], tok.sha256, dtype)
            entry[split] = {"file": name, "tokens": h.n_tokens, "docs": h.n_docs}
        manifest["chunks"].append(entry)
        _write_json_atomic(manifest_path, manifest)
        bar.update(n)

    model_bytes = tok.path.read_bytes()
    work = _chunks(cfg, done * cfg.docs_per_shard, stats)
    if cfg.workers == 1:
        _init_worker(model_bytes)
        for c, texts, empty, n in work:
            finish(c, _tokenize(texts, tok.eos_id, dtype.name), empty, n)
    else:
        with mp.get_context("fork").Pool(cfg.workers, _init_worker, (model_bytes, 1)) as pool:
            pending: deque = deque()
            for c, texts, empty, n in work:
                # split each chunk across the workers, keep at most two chunks in flight
                parts = [texts[i :: cfg.workers] for i in range(cfg.workers)]
                futs = [pool.apply_async(_tokenize, (p, tok.eos_id, dtype.name)) for p in parts]
                pending.append((c, futs, empty, n, len(texts)))
                while len(pending) > 1:
                    _collect(pending.popleft(), finish, cfg.workers)
            while pending:
                _collect(pending.popleft(), finish, cfg.workers)
    bar.close()
    manifest["counters"] = {
        "records": sum(ch["records"][1] - ch["records"][0] for ch in manifest["chunks"]),
        "empty_dropped": sum(ch["empty_dropped"] for ch in manifest["chunks"]),
        "undecodable_replaced_this_run": stats.undecodable_replaced,
        "tokens": {s: sum(ch[s]["tokens"] for ch in manifest["chunks"]) for s in ("train", "val")},
        "documents": {s: sum(ch[s]["docs"] for ch in manifest["chunks"]) for s in ("train", "val")},
    }
    manifest["complete"] = True
    _write_json_atomic(manifest_path, manifest)
    return manifest


def _collect(item, finish, workers):
    c, futs, empty, n, count = item
    parts = [f.get() for f in futs]
    docs = [None] * count
    for i, part in enumerate(parts):
        docs[i::workers] = part
    finish(c, docs, empty, n)


def _verified_prefix(out: Path, chunks: list[dict], tokenizer_sha256: str) -> list[dict]:
    """Keep the finished chunks whose shard files are present and valid, in order."""
    kept = []
    for i, ch in enumerate(chunks):
        if ch.get("index") != i:
            break
        try:
            for split in ("train", "val"):
                s = Shard(out / ch[split]["file"], tokenizer_sha256)
                if s.header.n_tokens != ch[split]["tokens"]:
                    raise ShardError(f"{s.path}: token count differs from the manifest")
        except (ShardError, KeyError):
            break
        kept.append(ch)
    return kept


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plait.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(PrepareConfig)
    for f in PrepareConfig.__dataclass_fields__.values():
        if f.name in ("show_progress",):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "special_tokens":
            p.add_argument(flag, nargs="*", default=[])
        elif f.name in ("source", "out"):
            p.add_argument(flag, required=True)
        elif typing.get_origin(hints[f.name]) is typing.Literal:
            p.add_argument(flag, choices=typing.get_args(hints[f.name]), default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    args = p.parse_args(argv)

    def body() -> int:
        cfg = PrepareConfig(**vars(args))
        try:
            manifest = prepare_corpus(cfg)
        except OSError as e:  # a full disk or a lost mount while writing the shards
            raise UserError(f"--out {cfg.out}: cannot write: {e}") from None
        print(json.dumps(manifest["counters"], indent=1))
        return 0

    return run_command(body, "prepare")


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["PrepareConfig", "prepare_corpus"]
