"""Checkpoints a cluster can trust: one logical tensor per parameter, written atomically,
loadable under any (TP, CP, DP, ZeRO stage) layout.

Why plait writes its own format rather than calling DeepSpeed's ``save_checkpoint``: that
writer pickles (loading needs ``torch.load(weights_only=False)``), fsyncs nothing and writes
``latest`` before its final barrier, so a pointer can name a half-written checkpoint; its
files hold TP shards and ZeRO partitions tied to the layout that wrote them, and its
resharding route (the universal-checkpoint converter) fails on megatron-core's
``_extra_state`` entries and supports neither ZeRO-0 nor optimizers whose state is not Adam's
(measured with DeepSpeed 0.19.8; docs/checkpoints.md). The logical format sidesteps all of
it: whatever wrote it, a checkpoint holds each parameter's full fp32 master weight and its
optimizer moments as plain tensors (safetensors: no pickle, lazy slicing), and every layout
reads its own TP slice and hands ZeRO its own partition.

A checkpoint ``<dir>/step<N>/``:
    shard-00000.safetensors ...  ``<param>`` (fp32 master weight), ``<param>::exp_avg``,
                                 ``<param>::exp_avg_sq``, in files of at most ~1 GiB
    rng-<rank>.safetensors       that rank's RNG states (torch, CUDA, numpy, python, megatron's
                                 model-parallel tracker), restored only under the same layout
    meta.json                    counters, LR schedule, loader position, layout, config,
                                 fingerprints, optimizer step, tensor index, file sizes and
                                 sha256
    COMPLETE                     written last, holds meta.json's sha256
``<dir>/latest`` names the newest complete one; it is replaced (write, fsync, rename) only
after every rank finished writing and the directory was renamed into place.

What a save does: gather (DP all-reduce of the ZeRO fragments, TP all-gather), rank 0 writes
the shards into ``.tmp-step<N>`` as it goes, every rank its RNG file, fsync, barrier, rank 0
writes meta.json and COMPLETE, renames the directory, moves ``latest``, prunes
(``checkpoint.keep_last``, ``checkpoint.keep_every``; a failed delete is reported, never
fatal). A process killed anywhere in this leaves either the old ``latest`` or the new, and a
``.tmp-*`` directory that resume reports and never reads.

Asynchronous saves (``checkpoint.async_save``, ``Saver``): everything collective (the gathers,
the barriers, every rank's RNG file) and the capture of every counter still happen at the step
boundary; rank 0 then keeps CPU copies of the gathered tensors and a background thread does
the rest in the same order (shards, fsync, meta.json, COMPLETE, rename, ``latest``, prune)
while training continues. One save at most is in flight: the next save and the end of the run
wait for it, collectively, so no rank counts a checkpoint done before rank 0 wrote it, and an
error in the writer is raised there on every rank.

The gathers and the redistribution to a layout live in plait.parallel.engine_state (with
the DeepSpeed internals they read); this module is files, order and checks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from plait.errors import UserError
from plait.parallel.engine_state import client_optimizer, load_logical_state, logical_state
from plait.parallel.runtime import (
    all_reduce_max,
    barrier,
    broadcast_object,
    gather_to_main,
    global_rank,
    stage_lead,
)

FORMAT = 1
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
SHARD_BYTES = 1 << 30


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used as asked (mismatched run, nothing loadable): one
    line for the user, the run exits non-zero."""


def _kill_point(point: str, step: int) -> None:
    """Fault injection for the atomicity tests:
    ``PLAIT_TEST_KILL_IN_SAVE=<point>[:<rank>][@<step>]`` SIGKILLs this process (rank 0 by
    default) at that point of a save (of that step only, when given), as ``kill -9`` would.
    Specs separated by ``;`` apply to the successive attempts of a torchrun job that restarts
    its workers (``TORCHELASTIC_RESTART_COUNT`` picks one)."""
    specs = os.environ.get("PLAIT_TEST_KILL_IN_SAVE", "")
    if not specs:
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    specs_by_attempt = specs.split(";")
    if attempt >= len(specs_by_attempt):
        return
    spec, _, at = specs_by_attempt[attempt].partition("@")
    name, _, rank = spec.partition(":")
    if name == point and int(rank or 0) == global_rank() and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def _hold_for_test() -> None:
    """Test hook for the overlap tests: ``PLAIT_TEST_HOLD_SAVE=<file>`` holds an asynchronous
    writer until that file exists, so a test can watch training go on while a save is in
    flight without relying on timing."""
    gate = os.environ.get("PLAIT_TEST_HOLD_SAVE", "")
    while gate and not Path(gate).exists():
        time.sleep(0.05)


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


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict[str, torch.Tensor]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    out["numpy.rest"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    out["numpy.gauss"] = torch.tensor([gauss], dtype=torch.float64)
    version, internal, gauss_next = random.getstate()
    out["python.state"] = torch.tensor(internal, dtype=torch.int64)
    out["python.version"] = torch.tensor([version], dtype=torch.int64)
    out["python.gauss"] = torch.tensor(
        [float("nan") if gauss_next is None else gauss_next], dtype=torch.float64
    )
    for k, s in get_cuda_rng_tracker().get_states().items():
        out[f"tracker.{k}"] = s
    return {k: v.contiguous() for k, v in out.items()}


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    pos, has_gauss = state["numpy.rest"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
         float(state["numpy.gauss"][0]))
    )  # fmt: skip
    g = float(state["python.gauss"][0])
    random.setstate(
        (int(state["python.version"][0]), tuple(state["python.state"].tolist()),
         None if g != g else g)
    )  # fmt: skip
    tracker = {k[len("tracker.") :]: v for k, v in state.items() if k.startswith("tracker.")}
    if tracker:
        get_cuda_rng_tracker().set_states(tracker)


# ----------------------------------------------------------------------------- saving


@dataclasses.dataclass
class RunIdentity:
    """What a checkpoint must agree with to be resumed: checked at load, field by field."""

    model: dict
    optimizer: str
    data: dict
    tokenizer_sha256: str

    def differences(self, saved: RunIdentity) -> dict[str, list[str]]:
        """Every field where this run differs from the ``saved`` one, by part (model, data,
        optimizer), each as ``field: saved -> this run`` with the full dotted name
        (``data.prepare.vocab_size: 2048 -> 1024``). An empty ``tokenizer_sha256`` on this
        side (not known yet: the data is not prepared) is not compared."""
        out: dict[str, list[str]] = {}
        for part in ("model", "data"):
            a, b = _flat(getattr(self, part)), _flat(getattr(saved, part))
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if keys:
                out[part] = [f"{part}.{k}: {_show(b.get(k))} -> {_show(a.get(k))}" for k in keys]
        if self.optimizer != saved.optimizer:
            out["optimizer"] = [f"optimizer.name: {saved.optimizer} -> {self.optimizer}"]
        if self.tokenizer_sha256 and self.tokenizer_sha256 != saved.tokenizer_sha256:
            out.setdefault("data", []).append(
                f"the tokenizer: sha256 {saved.tokenizer_sha256[:12]}... -> "
                f"{self.tokenizer_sha256[:12]}..."
            )
        return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value)


TOKENIZER_FIELDS = (
    "data.corpus",
    "data.prepare.text_field",
    "data.prepare.tokenizer",
    "data.prepare.tokenizer_type",
    "data.prepare.vocab_size",
    "data.prepare.special_tokens",
    "data.prepare.tokenizer_sample_docs",
)
"""Data fields that make the automatic preparation train another tokenizer (unless
``data.prepare.tokenizer`` names one): another vocabulary, which a checkpoint's embedding
cannot continue with."""


def check_fits(path: Path, meta: dict, identity: RunIdentity, allow: list[str]) -> None:
    """Refuse to resume ``path`` (its ``meta``) in a run whose identity differs, naming every
    differing field; ``allow`` (``checkpoint.allow_changes``) lifts the data check. The hint
    offered never leads to another refusal: continuing on other data is suggested only
    where the tokenizer stays."""
    saved = RunIdentity(**meta["identity"])
    diff = identity.differences(saved)
    for part in allow:
        diff.pop(part, None)
    if not diff:
        return
    lines = "; ".join(x for v in diff.values() for x in v)
    if set(diff) != {"data"}:
        hint = (
            "the model and the optimizer cannot change on resume: start a new run "
            "(another out_dir), or checkpoint.init_from for the weights alone"
        )
    elif any(x.startswith(TOKENIZER_FIELDS + ("the tokenizer",)) for x in diff["data"]):
        hint = (
            "another tokenizer would change the model's vocabulary: to continue on other "
            "data keep this run's (data.prepare.tokenizer=<its tokenizer.model>) and set "
            "checkpoint.allow_changes=[data]"
        )
    else:
        hint = "checkpoint.allow_changes=[data] continues deliberately on new data"
    raise CheckpointError(f"{path}: this run differs from the checkpoint ({lines}); {hint}")


def run_identity(cfg, tokenizer_sha256: str) -> RunIdentity:
    data = dataclasses.asdict(cfg.data)
    model = cfg.model.to_dict()
    model.pop("preset", None)  # a name; the fields it set are compared one by one
    model.pop("pipeline_marks", None)  # the layout's cut, not the model
    return RunIdentity(model, cfg.optimizer.name, data, tokenizer_sha256)


def _layout(rt, cfg) -> dict[str, int]:
    return {"tp": rt.tp, "pp": rt.pp, "cp": rt.cp, "dp": rt.dp, "world": rt.world_size,
            "zero_stage": cfg.parallel.zero_stage}  # fmt: skip


def _live_memory(engine) -> set[int]:
    """Storage addresses of the tensors training keeps changing: the model's parameters and
    the optimizer's state."""
    ptrs = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
    for st in client_optimizer(engine).state.values():
        ptrs.update(v.untyped_storage().data_ptr() for v in st.values() if torch.is_tensor(v))
    return ptrs


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": str(FORMAT)})
    _fsync_file(path)


@dataclasses.dataclass
class _Finish:
    """Rank 0's part of a save once every collective is done: the shards not written yet,
    the file hashes, meta.json, COMPLETE, the rename, ``latest`` and pruning. It touches no
    engine state and no process group, so it may run in a thread while training goes on."""

    ckpt_dir: Path
    tag: str
    step: int
    meta: dict
    shards: list[tuple[str, dict[str, torch.Tensor]]]
    keep_last: int
    keep_every: int

    def run(self) -> None:
        tmp, path = self.ckpt_dir / f".tmp-{self.tag}", self.ckpt_dir / self.tag
        while self.shards:  # released one by one: the CPU copies are rank 0's largest memory
            name, tensors = self.shards.pop(0)
            _write_shard(tmp / name, tensors)
        all_files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        self.meta["files"] = {
            f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in all_files
        }
        _write_atomic(tmp / META, json.dumps(self.meta, indent=1))
        _kill_point("meta", self.step)
        _write_atomic(tmp / COMPLETE, _sha256(tmp / META) + "\n")
        _kill_point("complete", self.step)
        if path.exists():  # the same step saved again (e.g. after a skipped-step abort)
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(self.ckpt_dir)
        _kill_point("rename", self.step)
        _write_atomic(self.ckpt_dir / LATEST, self.tag + "\n")
        prune(self.ckpt_dir, self.keep_last, self.keep_every, keep=self.tag)


def _write_error(tmp: Path, step: int, e: OSError) -> str:
    return (
        f"cannot write checkpoint {tmp.parent / f'step{step}'}: {e.strerror or e} "
        f"({e.filename or tmp}); the checkpoints before it are intact: free the space "
        "and run the same command to resume"
    )


def _agree_on_failure(error: str, tmp: Path) -> None:
    """Collective: every rank learns whether any rank failed to write its part of a save,
    and all raise the same CheckpointError (the partial ``.tmp-step*`` removed, freeing what
    it held), instead of one rank raising while the others wait in the next collective."""
    if not all_reduce_max(torch.tensor([float(bool(error))])).item():
        return
    errors = gather_to_main(error)
    message = broadcast_object(next((e for e in errors if e), "") if errors else "")
    if global_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(message)


def _capture(
    tmp: Path, step: int, engine, scheduler, loader, cfg, rt, identity: RunIdentity,
    loop_state: dict | None, hold: bool,
) -> _Finish | None:  # fmt: skip
    """The collective part of a save, on every rank, at the step boundary: gather every
    tensor (rank 0 writes each shard as it fills, or with ``hold`` keeps CPU copies nothing
    else writes to), write this rank's RNG file, barrier, and capture every counter. Returns
    rank 0's remaining work (None elsewhere)."""
    main = global_rank() == 0
    # Under pipeline stages each stage's first rank writes that stage's tensors (files
    # shard-pp<k>-*) and rank 0 collects the index; without stages the writer is rank 0.
    writer, pp_rank = stage_lead()
    prefix = f"pp{pp_rank}-" if pp_rank else ""
    hold = hold and main  # other stages' writers write at once (before the barrier)
    index: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    held: list[tuple[str, dict[str, torch.Tensor]]] = []
    buffer: dict[str, torch.Tensor] = {}
    size, n_files = 0, 0
    steps: set[int] = set()  # the optimizer's step count, one value for every tensor
    live = _live_memory(engine) if hold and main else set()

    failed = ""  # this rank's first write error: it goes on with the collectives, then all agree

    def flush() -> None:
        nonlocal buffer, size, n_files, failed
        if not buffer:
            return
        name = f"shard-{prefix}{n_files:05d}.safetensors"
        if hold:
            held.append((name, buffer))
        elif not failed:
            try:
                _write_shard(tmp / name, buffer)
            except OSError as e:
                failed = _write_error(tmp, step, e)
        n_files += 1
        buffer, size = {}, 0

    for name, tensors, opt_step in logical_state(engine):
        steps.add(opt_step)
        _kill_point("shards", step)
        if not writer:
            continue
        shapes[name] = list(tensors[""].shape)
        for k, t in tensors.items():
            key = name if not k else f"{name}::{k}"
            # At ZeRO-0 on CPU the "gathered" weight is the parameter itself: copy what
            # training would change under an asynchronous writer.
            own = t.clone() if t.untyped_storage().data_ptr() in live else t.contiguous()
            buffer[key] = own
            index[key] = f"shard-{prefix}{n_files:05d}.safetensors"
            size += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    if writer:
        flush()

    rng_name = f"rng-{global_rank():05d}.safetensors"
    try:
        save_file(_rng_state(), str(tmp / rng_name))
        _fsync_file(tmp / rng_name)
    except OSError as e:
        failed = failed or _write_error(tmp, step, e)
    _kill_point("rng", step)
    barrier()
    _agree_on_failure(failed, tmp)
    stages = gather_to_main((index, shapes, sorted(steps)) if writer else None)
    if not main:
        return None
    for part in stages or []:
        if part is not None and part[0] is not index:
            index = {**part[0], **index}  # a tied embedding is written by two stages
            shapes = {**part[1], **shapes}
            steps.update(part[2])
    if len(steps) > 1:
        raise CheckpointError(f"optimizer steps differ between parameters: {sorted(steps)}")
    meta = {
        "format": FORMAT,
        "kind": "logical",
        "step": step,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "optimizer_step": steps.pop() if steps else 0,
        "scheduler": scheduler.state_dict(),
        "loader": loader.state_dict(),
        "layout": _layout(rt, cfg),
        "identity": dataclasses.asdict(identity),
        "config": cfg.to_dict(),
        "loop": loop_state or {},
        "index": index,
        "shapes": shapes,
        "saved_at": time.time(),
    }
    meta = json.loads(json.dumps(meta))  # a snapshot: nothing live reaches the writer
    c = cfg.checkpoint
    return _Finish(tmp.parent, f"step{step}", step, meta, held, c.keep_last, c.keep_every)


class Saver:
    """A run's checkpoint writer; every rank holds one and calls ``save`` at the same steps.

    Synchronous (default): ``save`` returns once the checkpoint is complete on disk.
    Asynchronous (``checkpoint.async_save``): ``save`` does the collectives and captures every
    counter and RNG state at the step boundary, then rank 0's thread writes while training
    continues. Rank 0 holds CPU copies of the whole state until they are written (12 bytes a
    parameter, where the synchronous save holds one ~1 GiB shard). At most one save is in
    flight: ``wait`` (a collective; the next ``save`` calls it, the run calls it before it
    exits) joins the writer, and every rank learns there whether it succeeded; a writer's
    error is raised there as a CheckpointError, on every rank.
    """

    def __init__(self, ckpt_dir: Path, cfg, rt, identity: RunIdentity,
                 asynchronous: bool | None = None):  # fmt: skip
        self.ckpt_dir = Path(ckpt_dir)
        self.cfg, self.rt, self.identity = cfg, rt, identity
        self.asynchronous = cfg.checkpoint.async_save if asynchronous is None else asynchronous
        self._pending = ""  # the checkpoint in flight, known to every rank
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, engine, scheduler, loader, loop_state: dict | None = None) -> Path:
        """Write checkpoint ``step<step>`` (complete when this returns, or, asynchronous,
        after the next ``wait``) and prune. ``loop_state``: the training loop's own state
        (JSON), kept in meta.json under ``loop``. Returns the checkpoint's path."""
        self.wait()
        tag = f"step{step}"
        tmp = self.ckpt_dir / f".tmp-{tag}"
        failed = ""
        if global_rank() == 0:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                failed = _write_error(tmp, step, e)
        _agree_on_failure(failed, tmp)
        finish = _capture(tmp, step, engine, scheduler, loader, self.cfg,
                          self.rt, self.identity, loop_state, self.asynchronous)  # fmt: skip
        if not self.asynchronous:
            failed = ""
            if finish is not None:
                try:
                    finish.run()
                except OSError as e:
                    failed = _write_error(tmp, step, e)
            _agree_on_failure(failed, tmp)
            return self.ckpt_dir / tag
        self._pending = tag
        if finish is not None:
            self._thread = threading.Thread(target=self._write, args=(finish,),
                                            name=f"plait-save-{tag}")  # fmt: skip
            self._thread.start()
        return self.ckpt_dir / tag

    def _write(self, finish: _Finish) -> None:
        try:
            _hold_for_test()
            finish.run()
        except BaseException as e:  # raised by wait(), on every rank
            self._error = e

    def writing(self) -> bool:
        """Whether this rank's writer is still at work (rank 0; no collective)."""
        return self._thread is not None and self._thread.is_alive()

    def failed(self) -> bool:
        """Whether this rank's writer has already failed (rank 0; no collective). A run polls
        it at each step boundary, all-reduced with its other flags, and then calls ``wait``."""
        t = self._thread
        return t is not None and not t.is_alive() and self._error is not None

    def wait(self) -> None:
        """Return once the save in flight (if any) is complete on disk. A collective when one
        is in flight. Raises CheckpointError, on every rank, if rank 0's writer failed."""
        if not self._pending:
            return
        tag, self._pending = self._pending, ""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failed = all_reduce_max(torch.tensor([float(self._error is not None)]))
        if failed.item():
            error, self._error = self._error, None
            why = broadcast_object(f"{type(error).__name__}: {error}" if error else "")
            raise CheckpointError(
                f"the asynchronous save of {tag} failed on rank 0: {why}"
            ) from error

    def close(self) -> None:
        """Let a save in flight finish without a collective (the run is ending on an
        error): rank 0's checkpoint still completes; a writer's own error is printed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            print(f"checkpoint: the asynchronous save of {self._pending} failed: "
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)  # fmt: skip
        self._pending = ""


def save(
    ckpt_dir: Path, step: int, engine, scheduler, loader, cfg, rt, identity: RunIdentity,
    loop_state: dict | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint ``step<step>`` synchronously (every rank calls this) and prune.
    Returns its path."""
    saver = Saver(ckpt_dir, cfg, rt, identity, asynchronous=False)
    return saver.save(step, engine, scheduler, loader, loop_state)


def write_weights_only(ckpt_dir: Path, state: dict[str, torch.Tensor], model_cfg, source: str,
                       files: dict[str, Path] | None = None, seq_len: int | None = None):
    """A checkpoint ``<ckpt_dir>/step0`` that holds weights only (``kind: weights``: no
    moments, counters or RNG), written with the same atomic rules; what
    ``checkpoint.init_from`` starts a run from. ``files``: other files to keep in it, by name
    (an import's tokenizer.model), hashed like the rest; ``seq_len``: the training length the
    weights come with, if known. Returns its path."""
    ckpt_dir = Path(ckpt_dir)
    tmp, path = ckpt_dir / ".tmp-step0", ckpt_dir / "step0"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        name = "shard-00000.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / name),
                  metadata={"format": str(FORMAT)})  # fmt: skip
        _fsync_file(tmp / name)
        for other, src in (files or {}).items():
            shutil.copyfile(src, tmp / other)
            _fsync_file(tmp / other)
        listed = [name, *(files or {})]
        meta = {
            "format": FORMAT,
            "kind": "weights",
            "step": 0,
            "source": source,
            "model": model_cfg.to_dict(),
            "index": dict.fromkeys(state, name),
            "shapes": {k: list(v.shape) for k, v in state.items()},
            "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)}
                      for f in listed},  # fmt: skip
            "saved_at": time.time(),
        }
        if seq_len:
            meta["seq_len"] = int(seq_len)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"--out {ckpt_dir}: cannot write: {e.strerror or e}") from None
    _write_atomic(tmp / META, json.dumps(meta, indent=1))
    _write_atomic(tmp / COMPLETE, _sha256(tmp / META) + "\n")
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(ckpt_dir)
    _write_atomic(ckpt_dir / LATEST, "step0\n")
    return path


def resolve_init(path: Path) -> Path:
    """The checkpoint ``checkpoint.init_from`` names: ``path`` itself, or the newest complete
    one under it; verified (see ``verify``)."""
    path = Path(path)
    if path.is_dir() and not (path / META).is_file():
        found, problems = find_resumable(path)
        if found is None:
            why = "; ".join(problems) or "no checkpoint"
            raise CheckpointError(f"checkpoint.init_from: {path}: no complete checkpoint ({why})")
        path = found
    why = verify(path) if path.is_dir() else "not a directory"
    if why:
        raise CheckpointError(f"checkpoint.init_from: {path}: {why}")
    return path


def check_shapes(path: Path, meta: dict, model: torch.nn.Module, partial: bool = False,
                 what: str = "") -> None:
    """The checkpoint holds every parameter of ``model`` with its full (logical) shape, and
    (unless ``partial``: a pipeline stage holds some layers) nothing else; one line naming
    the first tensor that differs."""
    from plait.parallel.tensor_parallel import full_shape

    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(meta["shapes"]))
    extra = [] if partial else sorted(set(meta["shapes"]) - set(params))
    if missing or extra:
        raise CheckpointError(
            f"{what}{path}: parameters missing {missing[:5]}, unexpected {extra[:5]} (was it "
            "written for another model.*?)"
        )
    for name, p in params.items():
        want, got = full_shape(p), meta["shapes"][name]
        if want != got:
            vocab = " (another vocabulary: the tokenizer differs)" if "embedding" in name or (
                name.startswith("output")) else ""
            raise CheckpointError(
                f"{what}{path}: tensor {name} has shape {got}, this model's is {want}{vocab}"
            )


@torch.no_grad()
def init_weights_from(path: Path, model: torch.nn.Module, partial: bool = False) -> str:
    """Copy a checkpoint's full weights into this rank's TP shard of ``model`` (before the
    engine is built, so ZeRO's fp32 masters start from them). Every rank reads its own
    slice; names and full shapes are checked first. Returns the checkpoint's description."""
    from plait.parallel.tensor_parallel import tp_local

    path = resolve_init(path)
    meta = read_meta(path)
    check_shapes(path, meta, model, partial, "checkpoint.init_from: ")
    reader = _Reader(path, meta)
    for name, p in model.named_parameters():
        p.copy_(tp_local(p, reader.get(name)))
    return f"{path} ({meta.get('source') or meta.get('kind')})"


def _step_of(tag: str) -> int | None:
    m = re.fullmatch(r"step(\d+)", tag)
    return int(m.group(1)) if m else None


def prune(ckpt_dir: Path, keep_last: int, keep_every: int, keep: str = "") -> list[str]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0: keep all), except every
    ``keep_every``-th step and ``keep``. A failed delete is printed, not raised."""
    if keep_last <= 0:
        return []
    tags = sorted(
        (t for t in (p.name for p in Path(ckpt_dir).iterdir()) if _step_of(t) is not None),
        key=_step_of,
    )
    doomed = []
    for t in tags[:-keep_last]:
        s = _step_of(t)
        if t == keep or (keep_every and s % keep_every == 0):
            continue
        try:
            shutil.rmtree(Path(ckpt_dir) / t)
            doomed.append(t)
        except OSError as e:
            print(f"checkpoint: could not delete {Path(ckpt_dir) / t}: {e}", flush=True)
    return doomed


# ----------------------------------------------------------------------------- finding


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


def resolve(path: Path, tag: str = "", field: str = "--checkpoint") -> Path:
    """A checkpoint directory named on a command line: ``path`` itself if it is one, else
    ``path/tag``, else the newest complete one under ``path``; verified (see ``verify``).
    Anything unusable is a CheckpointError naming ``field``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{field} {path}: no such directory")
    if (path / META).is_file() or (path / COMPLETE).is_file():
        chosen = path
    elif tag:
        chosen = path / tag
        if not chosen.is_dir():
            have = sorted(p.name for p in path.glob("step*") if p.is_dir())
            raise CheckpointError(f"--tag {tag}: no {chosen}; checkpoints there: {have or 'none'}")
    else:
        found, problems = find_resumable(path)
        if found is None:
            why = "; ".join(problems) or "no checkpoint"
            raise CheckpointError(f"{field} {path}: no complete checkpoint ({why})")
        chosen = found
    why = verify(chosen)
    if why:
        raise CheckpointError(f"{field} {chosen}: not a usable checkpoint: {why}")
    return chosen


def find_resumable(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint in ``ckpt_dir`` by step, and a line per unusable one
    found on the way (incomplete, corrupt, leftover temporaries). ``latest`` is not trusted
    for this: a process killed between the rename and the pointer's move leaves a newer
    complete checkpoint than ``latest`` names."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, []
    problems = [f"{p}: an interrupted save (no completion), ignored" for p in
                sorted(ckpt_dir.glob(".tmp-step*"))]  # fmt: skip
    tags = sorted((p.name for p in ckpt_dir.iterdir() if _step_of(p.name) is not None),
                  key=_step_of, reverse=True)  # fmt: skip
    for t in tags:
        why = verify(ckpt_dir / t)
        if not why:
            return ckpt_dir / t, problems
        if why.startswith(REFUSED):
            # complete, but of a kind plait will not read: skipping it would start the run
            # over and, checkpoint by checkpoint, prune it
            raise CheckpointError(f"{ckpt_dir / t}: {why}; move it out of {ckpt_dir} to "
                                  "start over, or resume it with the plait that wrote it")
        problems.append(f"{ckpt_dir / t}: {why}; skipped")
    return None, problems


# ----------------------------------------------------------------------------- loading


class _Reader:
    def __init__(self, path: Path, meta: dict):
        self.path, self.index = path, meta["index"]
        self.files: dict[str, Any] = {}

    def get(self, key: str) -> torch.Tensor:
        name = self.index[key]
        if name not in self.files:
            self.files[name] = safe_open(str(self.path / name), framework="pt")
        return self.files[name].get_tensor(key)


@torch.no_grad()
def load(path: Path, engine, scheduler, loader, cfg, rt, identity: RunIdentity) -> dict:
    """Load checkpoint ``path`` into this rank's engine, whatever layout wrote it. Checks the
    run identity first (``checkpoint.allow_changes`` lifts the data check). Returns meta."""
    path = Path(path)
    meta = read_meta(path)
    if meta["kind"] != "logical":
        raise CheckpointError(f"{path}: a {meta['kind']} checkpoint holds no training state; "
                              "start from it with checkpoint.init_from")  # fmt: skip
    check_fits(path, meta, identity, cfg.checkpoint.allow_changes)
    same_layout = meta["layout"] == _layout(rt, cfg)
    # a pipeline stage holds only its own layers (checked whole by ``missing``)
    check_shapes(path, meta, engine.module, partial=rt.pp > 1)
    reader = _Reader(path, meta)
    client = load_logical_state(
        engine, lambda name, k: reader.get(name if not k else f"{name}::{k}"),
        meta["optimizer_step"],
    )  # fmt: skip
    engine.global_steps = meta["global_steps"]
    engine.global_samples = meta["global_samples"]
    engine.skipped_steps = meta["skipped_steps"]
    sched = dict(meta["scheduler"])
    regrouped = len(sched.get("base_lrs", [])) != len(scheduler.base_lrs)
    if rt.pp > 1 or meta["layout"].get("pp", 1) > 1 or regrouped:
        # Rank 0 saved its stage's per-group learning rates; every stage keeps its own groups'
        # base rates and recomputes them at the saved step (the schedule is one function).
        # The same when the parameter groups differ (ZeRO-3 has one per tensor, ZeRO 0-2 one
        # per set of hyperparameters; checkpoints before 2026-12-03 had one per tensor).
        for key in ("base_lrs", "_last_lr"):
            sched.pop(key, None)
        scheduler.load_state_dict(sched)
        pairs = zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
        scheduler._last_lr = [base * f(scheduler.last_epoch) for f, base in pairs]
    else:
        scheduler.load_state_dict(sched)
    for g, lr in zip(client.param_groups, scheduler.get_last_lr(), strict=True):
        g["lr"] = lr  # LambdaLR writes lr only at its next step
    loader.load_state_dict(meta["loader"])
    _restore_rng(path, same_layout, cfg, rt, meta)
    meta["resharded"] = not same_layout
    return meta


def _restore_rng(path: Path, same_layout: bool, cfg, rt, meta: dict) -> None:
    """Every RNG as saved by this rank; under another layout the ranks do not correspond, so
    every generator is reseeded deterministically from (seed, step) instead."""
    rng = path / f"rng-{global_rank():05d}.safetensors"
    if same_layout and rng.is_file():
        try:
            with safe_open(str(rng), framework="pt") as f:
                _set_rng_state({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(
                f"{rng}: not an RNG state this plait wrote ({type(e).__name__}: {e})"
            ) from None
    else:
        from plait.parallel.runtime import seed_everything

        seed_everything(cfg.training.seed + meta["step"], rt.pp_rank)
