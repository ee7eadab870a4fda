"""Sliding-window attention under sequence parallelism: exchange only the halo.

A query at the start of rank r's chunk needs the previous window - 1 keys and values, which
live at the end of rank r-1's chunk. Each rank sends exactly those h = window - 1 tokens to
the next rank (one P2P send and receive per step, independent of the sequence length) and
runs the local sliding-window kernel over [halo, own chunk]. The backward sends the halo's
gradients back to their owner. Rank 0 receives nothing (its halo is masked as "no document").
The halo must fit in one chunk (window - 1 <= tokens per rank); larger windows should use
LASP-2H.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plait.kernels.swa import swa

from .collectives import _count

if TYPE_CHECKING:
    from .sequence import SequenceParallel


def window(sp: SequenceParallel, q, k, v, window: int, doc_ids=None) -> torch.Tensor:
    """Sliding-window attention in the context ``sp`` (halo exchange of the last window - 1
    keys and values; letter W)."""
    sp.require_contiguous("sliding-window attention (halo exchange)")
    if sp.world == 1:
        return swa(q, k, v, window, doc_ids=doc_ids)
    return swa_sp(q, k, v, window, sp.group, doc_ids=doc_ids)


def _shift(x: torch.Tensor, group, forward: bool) -> torch.Tensor:
    """Send ``x`` to the next rank (forward) or the previous one (backward); return what
    arrives from the other side (zeros where there is no such rank)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    dst, src = (r + 1, r - 1) if forward else (r - 1, r + 1)
    x = x.contiguous()
    out = torch.zeros_like(x)
    ops = []
    if 0 <= dst < W:
        ops.append(dist.P2POp(dist.isend, x, dist.get_global_rank(group, dst), group))
        _count("p2p", x)
    if 0 <= src < W:
        ops.append(dist.P2POp(dist.irecv, out, dist.get_global_rank(group, src), group))
    for req in dist.batch_isend_irecv(ops) if ops else []:
        req.wait()
    return out


class _Halo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tail, group):
        ctx.group = group
        return _shift(tail, group, forward=True)

    @staticmethod
    def backward(ctx, grad):
        return _shift(grad, ctx.group, forward=False), None


def swa_sp(
    q_BHCD: torch.Tensor,
    k_BHCD: torch.Tensor,
    v_BHCE: torch.Tensor,
    window: int,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    B, H, C, D = q_BHCD.shape
    h = window - 1
    if dist.get_world_size(group) == 1 or h == 0:
        return swa(q_BHCD, k_BHCD, v_BHCE, window, doc_ids=doc_ids, backend=backend)
    if h > C:
        raise ValueError(
            f"swa_sp: window {window} needs a halo larger than the {C} tokens per rank"
        )
    r = dist.get_rank(group)
    halo_k = _Halo.apply(k_BHCD[:, :, C - h :], group)
    halo_v = _Halo.apply(v_BHCE[:, :, C - h :], group)
    docs = (
        doc_ids
        if doc_ids is not None
        else torch.zeros(B, C, dtype=torch.long, device=q_BHCD.device)
    )
    halo_docs = _shift(docs[:, C - h :], group, forward=True)
    if r == 0:
        halo_docs = torch.full_like(halo_docs, -1)  # nothing before the sequence start
    out = swa(
        torch.cat([torch.zeros_like(q_BHCD[:, :, :h]), q_BHCD], dim=2),
        torch.cat([halo_k, k_BHCD], dim=2),
        torch.cat([halo_v, v_BHCE], dim=2),
        window,
        doc_ids=torch.cat([halo_docs, docs], dim=1),
        backend=backend,
    )
    return out[:, :, h:]
