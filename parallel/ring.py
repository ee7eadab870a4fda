"""Ring Attention for the softmax layers (the alternative to LASP-2H).

The sequence is cut into chunks; each rank owns some of them: contiguous layout (rank r owns
chunk r of W) or zigzag (2W chunks; rank r owns chunks r and 2W-1-r, so every rank has the
same amount of causal work). K and V blocks travel around the ring: at step i a rank attends
with its queries to the block owned by rank r - i while sending that block on to r + 1 (the
send is issued before the compute, so they overlap). Partial results are merged with the
log-sum-exp rule in float32. A visiting block that causality masks entirely is skipped; with
zigzag every rank then does the same number of block products. (Skipping the masked chunk
pairs inside a partly visible zigzag block, which halves the remaining work, is not done yet.)

Backward: the same ring again, carrying (K, V, dK, dV): each rank adds its queries'
contribution to the visiting block's dK, dV, and after W steps every block is back at its
owner with the full gradient. Probabilities are recomputed from the saved row log-sum-exp.
Documents: keys of another document are masked (doc ids travel with the blocks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import _count


def zigzag_chunks(W: int, r: int) -> list[int]:
    return [r, 2 * W - 1 - r]


def layout_index(T: int, W: int, r: int, zigzag: bool) -> torch.Tensor:
    """Token indices of the full sequence held by rank r."""
    if not zigzag:
        C = T // W
        return torch.arange(r * C, (r + 1) * C)
    c = T // (2 * W)
    return torch.cat([torch.arange(i * c, (i + 1) * c) for i in zigzag_chunks(W, r)])


def _ring_pass(tensors: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns
    the receive buffers and a waiter (call it before using them)."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (r + 1) % W)
    prv = dist.get_global_rank(group, (r - 1) % W)
    tensors = [t.contiguous() for t in tensors]
    recv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prv, group) for b in recv]
    for t in tensors:
        _count("p2p", t)
    reqs = dist.batch_isend_irecv(ops)

    def wait():
        for q in reqs:
            q.wait()
        return recv

    return wait


def _pair_mask(qpos, kpos, qdoc, kdoc):
    m = kpos[None, :] <= qpos[:, None]
    m = m[None] if qdoc is None else m[None] & (qdoc[:, :, None] == kdoc[:, None, :])
    return m[:, None]  # [B|1, 1, Cq, Ck]


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos, docs, group, scale):
        acc = torch.promote_types(q.dtype, torch.float32)
        W = dist.get_world_size(group)
        qa, ka, va = (x.to(acc) for x in (q, k, v))
        B, H, L, _ = q.shape
        o = torch.zeros(B, H, L, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), dtype=acc, device=q.device)
        blk = [ka, va, pos] + ([docs] if docs is not None else [])
        for step in range(W):
            wait = _ring_pass(blk, group) if step < W - 1 else None
            kb, vb, pb = blk[0], blk[1], blk[2]
            db = blk[3] if docs is not None else None
            mask = _pair_mask(pos, pb, docs, db)
            if mask.any():
                s = (qa @ kb.transpose(-1, -2)) * scale
                s = s.masked_fill(~mask, float("-inf"))
                lse_b = torch.logsumexp(s, dim=-1)  # -inf on rows with no visible key
                p = torch.exp(s - torch.where(torch.isinf(lse_b), 0.0, lse_b)[..., None])
                o_b = p @ vb  # normalised within the block (zero on empty rows)
                new = torch.logaddexp(lse, lse_b)
                safe = torch.where(torch.isinf(new), 0.0, new)
                o = o * torch.exp(lse - safe)[..., None] + o_b * torch.exp(lse_b - safe)[..., None]
                lse = new
            if wait is not None:
                blk = wait()
        ctx.save_for_backward(q, k, v, pos, docs if docs is not None else pos, o, lse)
        ctx.group, ctx.scale, ctx.has_docs = group, scale, docs is not None
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos, docs, o, lse = ctx.saved_tensors
        docs = docs if ctx.has_docs else None
        group, scale = ctx.group, ctx.scale
        W = dist.get_world_size(group)
        acc = o.dtype
        qa, doa = q.to(acc), do.to(acc)
        delta = (doa * o).sum(-1, keepdim=True)
        dq = torch.zeros_like(qa)
        blk = [
            k.to(acc),
            v.to(acc),
            torch.zeros_like(k, dtype=acc),
            torch.zeros_like(v, dtype=acc),
            pos,
        ]
        if docs is not None:
            blk.append(docs)
        for _ in range(W):
            kb, vb, dkb, dvb, pb = blk[:5]
            db = blk[5] if docs is not None else None
            mask = _pair_mask(pos, pb, docs, db)
            if mask.any():
                s = (qa @ kb.transpose(-1, -2)) * scale
                p = torch.exp(s - lse[..., None]).masked_fill(~mask, 0.0)
                dvb = dvb + p.transpose(-1, -2) @ doa
                ds = p * (doa @ vb.transpose(-1, -2) - delta)
                dq += (ds @ kb) * scale
                dkb = dkb + (ds.transpose(-1, -2) @ qa) * scale
            blk = [kb, vb, dkb, dvb, pb] + ([db] if docs is not None else [])
            # W passes: after the last one every block (with its dK, dV) is home again
            blk = _ring_pass(blk, group)()
        dk, dv = blk[2], blk[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(
    q_BHLD: torch.Tensor,
    k_BHLD: torch.Tensor,
    v_BHLE: torch.Tensor,
    positions_L: torch.Tensor,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's tokens (global positions ``positions_L``, any layout)
    over the whole sequence; ``doc_ids`` [B, L] are global document ids."""
    scale = q_BHLD.shape[-1] ** -0.5 if scale is None else scale
    return _Ring.apply(q_BHLD, k_BHLD, v_BHLE, positions_L, doc_ids, group, float(scale))
