"""Sliding-window attention on CPU from torch's CPU flash kernel: no score slabs in memory.

Cut a document into blocks of C = window - 1 tokens. Query i of a block sees keys j <= i of
its own block and keys j >= i of the previous block (a query sees itself and the window - 1
keys before it: in the previous block exactly those at or after its own offset), nothing
earlier. The first part is causal attention on the block; the second becomes causal
attention too once both the queries and the previous block's keys are taken in reverse order
(j >= i is j' <= i' with i' = C - 1 - i). So one window layer is two batched causal calls of
torch's CPU flash operator over [C, C] blocks, merged by their log-sum-exp, with the exact
backward of the union from each part's flash backward given the merged output and
log-sum-exp (as kernels/attention/prefix.py merges a prefix with causal keys).

Against the blocked path (chunk.py), which materialises [C, 2C] scores per block and runs
softmax and its backward over them: half the score products (the causal halves only) and no
T x 2C temporaries. Documents: each is cut out of the row (one piece per document, like
kernels/attention/segments.py) and padded at its end to a multiple of C; padded queries are
dropped, and padded keys come after every real query, which causality already hides. Needs
values as wide as the keys (the flash operator's constraint) and window >= 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.kernels.attention.prefix import _flash, _flash_backward
from plait.kernels.attention.segments import per_document


def _blocks(x: torch.Tensor, C: int) -> torch.Tensor:
    """[B, H, n, D] -> [B, H * nb, C, D], padded at the end to nb * C tokens."""
    B, H, n, D = x.shape
    nb = -(-n // C)
    if nb * C != n:
        x = F.pad(x, (0, 0, 0, nb * C - n))
    return x.reshape(B, H * nb, C, D)


class _WindowFlash(torch.autograd.Function):
    """One document (no boundaries inside): q, k, v [B, H, n, D] -> [B, H, n, D]."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float):
        B, H, n, D = q.shape
        C = window - 1
        nb = -(-n // C)
        Qb, Kb, Vb = (_blocks(x, C) for x in (q, k, v))
        o, lse = _flash(Qb, Kb, Vb, 0.0, True, scale=scale)
        if nb > 1:
            # previous block's keys, everything in reverse order within the block
            Qr, Kr, Vr = _prev_reversed(Qb, Kb, Vb, B, H, nb)
            o2, l2 = _flash(Qr, Kr, Vr, 0.0, True, scale=scale)
            o2, l2 = o2.flip(-2), l2.flip(-1)
            o, lse = _merge(o.view(B, H, nb, C, D), lse.view(B, H, nb, C), o2, l2)
        ctx.save_for_backward(Qb, Kb, Vb, o, lse)
        ctx.shape, ctx.window, ctx.scale = (B, H, n, D, nb), window, scale
        return o.reshape(B, H, nb * C, D)[:, :, :n]

    @staticmethod
    def backward(ctx, do):
        Qb, Kb, Vb, o, lse = ctx.saved_tensors
        B, H, n, D, nb = ctx.shape
        C = ctx.window - 1
        do = do.contiguous()
        dob = _blocks(do, C)
        o, lse = o.reshape(B, H * nb, C, D), lse.reshape(B, H * nb, C)
        grads = _flash_backward(dob, Qb, Kb, Vb, o, lse, 0.0, True, scale=ctx.scale)
        dq, dk, dv = (g.contiguous() for g in grads)  # the operator may return them strided
        if nb > 1:
            Qr, Kr, Vr = _prev_reversed(Qb, Kb, Vb, B, H, nb)
            rev = [x.view(B, H, nb, C, *x.shape[3:])[:, :, 1:].flip(3).reshape(
                B, H * (nb - 1), C, *x.shape[3:]) for x in (dob, o, lse[..., None])]
            dqr, dkr, dvr = _flash_backward(rev[0], Qr, Kr, Vr, rev[1], rev[2][..., 0], 0.0,
                                            True, scale=ctx.scale)
            dq.view(B, H, nb, C, D)[:, :, 1:] += dqr.view(B, H, nb - 1, C, D).flip(3)
            dk.view(B, H, nb, C, D)[:, :, :-1] += dkr.view(B, H, nb - 1, C, D).flip(3)
            dv.view(B, H, nb, C, D)[:, :, :-1] += dvr.view(B, H, nb - 1, C, D).flip(3)
        unblock = [x.view(B, H, nb * C, D)[:, :, :n] for x in (dq, dk, dv)]
        return *unblock, None, None


def _prev_reversed(Qb, Kb, Vb, B: int, H: int, nb: int):
    """Queries of blocks 1.. and keys/values of blocks ..nb-2, each block in reverse order:
    [B, H * (nb - 1), C, D] each."""
    C, D = Qb.shape[2], Qb.shape[3]

    def pick(x, sl):
        return x.view(B, H, nb, C, D)[:, :, sl].flip(3).reshape(B, H * (nb - 1), C, D)

    return pick(Qb, slice(1, None)), pick(Kb, slice(None, -1)), pick(Vb, slice(None, -1))


def _merge(o1, l1, o2, l2):
    """Softmax over the union of two key sets from each part's output and log-sum-exp; the
    first block of each row has only its own part. o1 [B, H, nb, C, D], l1 [B, H, nb, C];
    o2, l2 for blocks 1.. . Returns (o, lse) over [B, H * nb, C(, D)]."""
    B, H, nb, C, D = o1.shape
    o2 = o2.view(B, H, nb - 1, C, D)
    l2 = l2.view(B, H, nb - 1, C)
    l_own = l1[:, :, 1:]
    lse_rest = torch.logaddexp(l_own, l2)
    o_rest = o1[:, :, 1:] * torch.exp(l_own - lse_rest)[..., None]
    o_rest += o2 * torch.exp(l2 - lse_rest)[..., None]
    o = torch.cat([o1[:, :, :1], o_rest.to(o1.dtype)], 2)
    lse = torch.cat([l1[:, :, :1], lse_rest], 2)
    return o.reshape(B, H * nb, C, D), lse.reshape(B, H * nb, C)


def swa_flash_cpu(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    window: int,
    doc_ids_BT: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Sliding-window attention (module docstring); q, k, v [B, H, T, D], window >= 2."""
    if window < 2 or v_BHTD.shape[-1] != q_BHTD.shape[-1]:
        raise ValueError(
            f"swa_flash_cpu: needs window >= 2 and values as wide as the keys; got window "
            f"{window}, q {tuple(q_BHTD.shape)}, v {tuple(v_BHTD.shape)}"
        )
    scale = q_BHTD.shape[-1] ** -0.5 if scale is None else scale
    if doc_ids_BT is None:
        return _WindowFlash.apply(q_BHTD, k_BHTD, v_BHTD, window, scale)

    def window_attention(q, k, v):
        return _WindowFlash.apply(q, k, v, window, scale)

    return per_document(window_attention, q_BHTD, k_BHTD, v_BHTD, doc_ids_BT)
