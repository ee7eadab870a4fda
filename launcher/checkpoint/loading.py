"""Reading checkpoints back: a training checkpoint into a built engine under any layout
(``load``: weights, optimizer state, counters, schedule, loader position, RNG), or the
weights alone into a model before its engine is built (``init_weights_from``). The run's
identity and every tensor's name and full shape are checked before a tensor is copied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from plait.parallel.engine_state import load_logical_state
from plait.parallel.runtime import global_rank

from .finding import resolve_init
from .format import CheckpointError, read_meta
from .identity import RunIdentity, _layout, check_fits
from .rng import _set_rng_state


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
                              "start from it with checkpoint.init_from")
    check_fits(path, meta, identity, cfg.checkpoint.allow_changes)
    same_layout = meta["layout"] == _layout(rt, cfg)
    # a pipeline stage holds only its own layers (checked whole by ``missing``)
    check_shapes(path, meta, engine.module, partial=rt.pp > 1)
    reader = _Reader(path, meta)
    client = load_logical_state(
        engine, lambda name, k: reader.get(name if not k else f"{name}::{k}"),
        meta["optimizer_step"],
    )
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
