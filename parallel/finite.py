"""Skipping a step whose gradients are not finite, agreed by every rank.

Under ZeRO 1-2 DeepSpeed does this itself: its optimizer all-reduces the global gradient
norm and, when it is inf or NaN, drops the step, counts it in ``engine.skipped_steps`` and
leaves the LR schedule where it was (fp32, and bf16 with ``check_grad_overflow``). At ZeRO-0
DeepSpeed hands the client optimizer the gradients as they are, so a NaN would reach the
weights. ``SkipNonFinite`` gives a client optimizer the same behaviour: it all-reduces a
non-finite flag over every rank (TP ranks hold different shards, so one rank's NaN must stop
all of them) and, when set, does nothing and reports ``overflow = True``, which DeepSpeed's
engine reads after ``step()`` to count the skip and hold the schedule (engine.py
``_take_model_step``, DeepSpeed 0.19).

A step can also be skipped on purpose (a loss spike, launcher/loop.py): every rank agrees
(``any_rank``) and ``poisoned`` makes the last micro batch's loss NaN before its backward, so
the step takes exactly the path above (DeepSpeed's overflow check at ZeRO 1-3, fp32 and bf16;
``SkipNonFinite`` at ZeRO-0): weights, moments and the LR schedule stay as they were, and
``engine.skipped_steps`` counts it. One path for every ZeRO stage, rather than reaching into
each of DeepSpeed's optimizers to drop a step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .lamb import Lamb
from .runtime import all_reduce_max


def nonfinite_anywhere(tensors: list[torch.Tensor]) -> bool:
    """Whether any of these tensors, on any rank, holds an inf or NaN (a collective)."""
    bad = torch.zeros(1)
    for t in tensors:
        if not torch.isfinite(t).all():
            bad.fill_(1.0)
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        bad = bad.to(tensors[0].device if tensors else "cpu")
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective every rank calls at the same point):
    a decision all ranks must take together."""
    return bool(all_reduce_max(torch.tensor([float(flag)])).item())


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` made NaN, so that its backward makes every gradient NaN and the optimizer
    step is skipped (and counted) as a non-finite one; call it on every rank."""
    return loss * float("nan")


class SkipNonFinite:
    """Mixin for a client optimizer: skip the step (on every rank) when a gradient is not
    finite, and say so in ``overflow``."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = nonfinite_anywhere(grads)
        if self.overflow:
            return None
        return super().step(closure)


class GuardedLamb(SkipNonFinite, Lamb):
    """plait's LAMB at ZeRO-0."""


class GuardedAdamW(SkipNonFinite, torch.optim.AdamW):
    """torch's AdamW at ZeRO-0."""
