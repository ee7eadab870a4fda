"""The on-disk format and its checks: file names, the error type, durable writes (fsync,
then an atomic rename), sha256, what each ``kind`` of meta.json must hold, and ``verify``,
which a checkpoint passes before anything reads a tensor from it. The layout of a checkpoint
directory: the package docstring."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from plait.errors import UserError

FORMAT = 1
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked (mismatched run, nothing loadable): one
    line for the user, the run exits non-zero."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


KINDS = {
    "logical": ("step", "global_steps", "global_samples", "skipped_steps", "optimizer_step",
                "scheduler", "loader", "layout", "identity", "config", "index", "shapes",
                "files"),
    "weights": ("step", "model", "index", "shapes", "files"),
}
"""What plait reads, by ``kind``, and the meta.json fields each must have. Both are
safetensors and JSON only: no kind selects a loader that unpickles."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


REFUSED = ("kind ", "format ")
"""How ``verify`` begins when a checkpoint is complete but not one this plait reads (another
format version, a pickled kind): the run refuses it rather than skipping to an older one."""


def saved_config(meta: dict) -> dict:
    """The run config a checkpoint carries, shaped as a config file: a training checkpoint's
    whole config; a weights-only one's model, and the training length it came with."""
    if meta["kind"] == "logical":
        return meta["config"]
    return {"model": meta["model"], "data": {"seq_len": int(meta.get("seq_len", 128))}}


def read_meta(path: Path) -> dict:
    """meta.json of a verified checkpoint."""
    return json.loads((Path(path) / META).read_text())


def verify(path: Path) -> str:
    """'' when ``path`` is a complete, intact checkpoint that plait can read; else what is
    wrong with it, naming the file or tensor. Checks the completion marker against
    meta.json, meta.json's kind and fields, every file's size and sha256 against meta.json,
    and every tensor's name, shape and dtype in the safetensors headers against meta.json
    (before any tensor is read). The hashes catch torn, truncated and corrupted files; they
    are written by the checkpoint itself, so they prove nothing against a deliberate forgery
    (docs/checkpoints.md): what protects a run from a crafted checkpoint is that nothing here
    executes code from it (no pickle) and that every tensor is checked before use."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return "no completion marker (a save that did not finish)"
    if not (path / META).is_file():
        return "meta.json is missing"
    if (path / COMPLETE).read_text().strip() != _sha256(path / META):
        return "meta.json does not match its completion marker"
    try:
        meta = read_meta(path)
    except ValueError as e:
        return f"meta.json is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return "meta.json is not a mapping"
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')} (this plait reads {FORMAT})"
    kind = meta.get("kind")
    if kind == "deepspeed-zero3":
        return ("kind 'deepspeed-zero3': DeepSpeed's pickled ZeRO-3 files (plait before "
                "2026-12), which plait no longer loads: a pickle can run code")
    if kind not in KINDS:
        return f"kind {kind!r} is unknown (plait reads {', '.join(KINDS)})"
    missing = [k for k in KINDS[kind] if k not in meta]
    if missing:
        return f"meta.json: no {', '.join(missing)} (kind {kind})"
    files, index, shapes = meta["files"], meta["index"], meta["shapes"]
    if not all(isinstance(x, dict) for x in (files, index, shapes)):
        return "meta.json: files, index and shapes must be mappings"
    for name, info in files.items():
        if not _SAFE_NAME.fullmatch(name) or not isinstance(info, dict):
            return f"meta.json: file entry {name!r} is not a file of this directory"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != info.get("bytes"):
            return f"{name} has {f.stat().st_size} bytes, expected {info.get('bytes')}"
        if _sha256(f) != info.get("sha256"):
            return f"{name}: sha256 mismatch"
    return _check_tensors(path, meta)


def _check_tensors(path: Path, meta: dict) -> str:
    """Every tensor meta.json indexes: in a listed safetensors file, with the shape
    meta.json gives for its parameter and a floating dtype (float32 for optimizer state)."""
    headers: dict[str, Any] = {}
    for key, name in meta["index"].items():
        param, _, moment = key.partition("::")
        if name not in meta["files"] or not name.endswith(".safetensors"):
            return f"meta.json: tensor {key} is indexed in {name!r}, not a listed shard"
        if param not in meta["shapes"]:
            return f"meta.json: tensor {key} has no shape"
        if name not in headers:
            try:
                f = safe_open(str(path / name), framework="pt")
            except Exception as e:  # safetensors' own error type for a malformed header
                return f"{name}: not a safetensors file ({e})"
            headers[name] = (f, set(f.keys()))
        f, keys = headers[name]
        if key not in keys:
            return f"{name}: has no tensor {key}"
        piece = f.get_slice(key)
        shape, dtype = list(piece.get_shape()), piece.get_dtype()
        if shape != meta["shapes"][param]:
            return f"{name}: tensor {key} has shape {shape}, meta.json says {meta['shapes'][param]}"
        if dtype not in _DTYPES or (moment and dtype != "F32"):
            return f"{name}: tensor {key} has dtype {dtype}, expected F32"
    return ""
