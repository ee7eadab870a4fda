"""Writing checkpoints: the collective part at the step boundary (``_capture``: gathers,
RNG files, barrier, every counter), rank 0's remaining work (``_Finish``: shards, hashes,
meta.json, COMPLETE, rename, ``latest``, pruning), the run's writer (``Saver``, synchronous
or asynchronous) and weights-only checkpoints (``write_weights_only``). The order of a save,
and why it survives a kill anywhere: the package docstring. The points a test may kill a
save at: plait.launcher.faults."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from plait.launcher.faults import hold_save, kill_point
from plait.parallel.engine_state import client_optimizer, logical_state
from plait.parallel.runtime import (
    all_reduce_max,
    barrier,
    broadcast_object,
    gather_to_main,
    global_rank,
    stage_lead,
)

from .finding import prune
from .format import (
    COMPLETE,
    FORMAT,
    LATEST,
    META,
    CheckpointError,
    _fsync_dir,
    _fsync_file,
    _sha256,
    _write_atomic,
)
from .identity import RunIdentity, _layout
from .rng import _rng_state

SHARD_BYTES = 1 << 30
"""A shard file is closed once it holds this many bytes (the ~1 GiB files of the format)."""


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
        kill_point("meta", self.step)
        _write_atomic(tmp / COMPLETE, _sha256(tmp / META) + "\n")
        kill_point("complete", self.step)
        if path.exists():  # the same step saved again (e.g. after a skipped-step abort)
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(self.ckpt_dir)
        kill_point("rename", self.step)
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
) -> _Finish | None:
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
        kill_point("shards", step)
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
    kill_point("rng", step)
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
                 asynchronous: bool | None = None):
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
                          self.rt, self.identity, loop_state, self.asynchronous)
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
                                            name=f"plait-save-{tag}")
            self._thread.start()
        return self.ckpt_dir / tag

    def _write(self, finish: _Finish) -> None:
        try:
            hold_save()
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
                  f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self._pending = ""


def save(
    ckpt_dir: Path, step: int, engine, scheduler, loader, cfg, rt, identity: RunIdentity,
    loop_state: dict | None = None,
) -> Path:
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
                  metadata={"format": str(FORMAT)})
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
                      for f in listed},
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
