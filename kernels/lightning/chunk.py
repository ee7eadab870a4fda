"""Chunked causal linear attention with decay (Lightning Attention-2 tiling), in PyTorch.

The sequence is cut into blocks of ``block`` tokens. Per block i (positions a, b inside it):
  * intra-block: O_i = ((Q_i K_i^T) * M) V_i,   M[a, b] = lambda^(a - b) for a >= b;
  * inter-block: O_i += (Q_i * qd) S_i,          qd[a] = lambda^(a + 1);
  * state:       S_{i+1} = c S_i + (K_i * kd)^T V_i,  kd[b] = lambda^(L - 1 - b), c = lambda^L,
with L the block's length (the last block may be shorter: it is not padded, so the final state
is exact and generation can continue from it). Document boundaries only change the tables:
M also needs doc(a) = doc(b), qd needs doc(a) = doc(block start - 1), kd needs doc(b) =
doc(block end), and c needs the block to start no new document. The backward pass uses the
same tables (derivation in the docstring of ``_LightningChunk.backward``).

Why an explicit autograd.Function rather than autograd through the loop: the blocks are
processed in groups of ``group`` tokens, forward and backward, so the working set stays
cache-sized whatever the sequence length (autograd over the whole sequence made the cost
per token grow ~1.5x from 1K to 16K tokens on CPU); only the block-start states are saved.
The running state is kept in float32 (float64 if the inputs are): it sums the whole prefix.

The per-token factors qd and kd scale rows, so they are applied on the value side (width E)
of each product, never on the query/key side (width D): (Q * qd) S = qd * (Q S) and
(K * kd)^T V = K^T (kd * V). Where D > E (Based's 153 Taylor features over 33 value
columns; TransNormerLLM's LRPE doubles D) that is D / E times less element-wise work and
memory traffic; where D = E it is the same.

Per-token decays (``g`` [B, H, T], token t's decay a_t = exp(g_t - s_h)) change only the
tables: with G the running sum of g - s inside the block, M[a, b] = exp(G_a - G_b),
qd[a] = exp(G_a), kd[b] = exp(G_{L-1} - G_b), c = exp(G_{L-1}); they are then per row and
per block instead of per head. The gradient of g needs no sweep of its own: writing the
operator in q_t e^{G_t} and k_j e^{-G_j} (the decay-free form), dL/dG_t = q_t . dq_t -
k_t . dk_t (+ <dS_final, S_final> at the last token), and dg is the reverse running sum of
that. Without ``g`` the constant-slope tables are used exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Segment:
    t0: int  # first token
    nb: int  # blocks in this segment
    L: int  # tokens per block
    blk0: int  # index of the first block among all blocks

    @property
    def t1(self) -> int:
        return self.t0 + self.nb * self.L


def _segments(T: int, block: int, group: int) -> list[_Segment]:
    segs, n_full, rem = [], T // block, T % block
    per = max(1, group // block)
    for b0 in range(0, n_full, per):
        nb = min(per, n_full - b0)
        segs.append(_Segment(b0 * block, nb, block, b0))
    if rem:
        segs.append(_Segment(n_full * block, 1, rem, n_full))
    return segs


def _decay_tables(s_H: torch.Tensor, L: int):
    pos = torch.arange(L, device=s_H.device, dtype=s_H.dtype)
    dist = pos[:, None] - pos[None, :]
    M = torch.exp((-s_H[:, None, None] * dist).masked_fill(dist < 0, float("-inf")))
    qd = torch.exp(-s_H[:, None] * (pos + 1))
    kd = torch.exp(-s_H[:, None] * (L - 1 - pos))
    carry = torch.exp(-s_H * L)
    return M, qd, kd, carry


def _token_decay_tables(s_H: torch.Tensor, g_BHT: torch.Tensor, seg: _Segment):
    """The tables of one segment from per-token log-decays: [B, H, nb, L(, L)]."""
    B, H, _ = g_BHT.shape
    G = (g_BHT[:, :, seg.t0 : seg.t1] - s_H[None, :, None]).view(B, H, seg.nb, seg.L).cumsum(-1)
    upper = torch.ones(seg.L, seg.L, dtype=torch.bool, device=G.device).triu(1)
    M = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(upper, float("-inf")))
    last = G[..., -1:]
    return M, torch.exp(G), torch.exp(last - G), torch.exp(last[..., 0])


class _Tables:
    """Per-segment decay and document tables, broadcastable to [B, H, nb, L(, L)]."""

    def __init__(
        self, s_H: torch.Tensor, doc_ids: torch.Tensor | None, T: int, g: torch.Tensor | None
    ):
        self.s_H = s_H
        self.doc_ids = doc_ids
        self.T = T
        self.g = g
        self._cache: dict[int, tuple] = {}

    def __call__(self, seg: _Segment):
        if self.g is not None:
            M, qd, kd, carry = _token_decay_tables(self.s_H, self.g, seg)
        else:
            if seg.L not in self._cache:
                self._cache[seg.L] = _decay_tables(self.s_H, seg.L)
            M, qd, kd, carry = self._cache[seg.L]
            M, qd, kd = M[None, :, None], qd[None, :, None], kd[None, :, None]
            carry = carry[None, :, None].expand(1, -1, seg.nb)
        if self.doc_ids is None:
            return M, qd, kd, carry
        B = self.doc_ids.shape[0]
        d = self.doc_ids[:, seg.t0 : seg.t1].view(B, seg.nb, seg.L)
        starts = torch.arange(seg.t0, seg.t1, seg.L, device=d.device)
        prev = self.doc_ids[:, (starts - 1).clamp_min(0)]  # block 0 continues the initial state
        end = d[:, :, -1]
        dt = M.dtype
        M = M * (d[..., :, None] == d[..., None, :])[:, None].to(dt)
        qd = qd * (d == prev[..., None])[:, None].to(dt)
        kd = kd * (d == end[..., None])[:, None].to(dt)
        carry = carry * (prev == end)[:, None].to(dt)
        return M, qd, kd, carry


def _blocks(x: torch.Tensor, seg: _Segment) -> torch.Tensor:
    """The segment as [B, H, nb, L, F], contiguous: one copy here instead of one inside every
    matmul that would otherwise have to flatten the non-mergeable (B, H, nb) batch dims."""
    B, H, _, F = x.shape
    return x[:, :, seg.t0 : seg.t1].reshape(B, H, seg.nb, seg.L, F).contiguous()


class _LightningChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, doc_ids, initial_state, block, group, g):
        acc = torch.promote_types(q.dtype, torch.float32)
        B, H, T, D = q.shape
        E = v.shape[-1]
        qa, ka, va = (x.to(acc) for x in (q, k, v))
        ga = g.to(acc) if g is not None else None
        tables = _Tables(slopes.to(acc), doc_ids, T, ga)
        segs = _segments(T, block, group)
        S = (
            initial_state.to(acc).clone()
            if initial_state is not None
            else q.new_zeros(B, H, D, E, dtype=acc)
        )
        outs, states = [], []
        for seg in segs:
            M, qd, kd, carry = tables(seg)
            Qg, Kg, Vg = _blocks(qa, seg), _blocks(ka, seg), _blocks(va, seg)
            scores = (Qg @ Kg.transpose(-1, -2)).mul_(M)
            o = scores @ Vg
            kv = Kg.transpose(-1, -2) @ (Vg * kd[..., None])
            seg_states = []
            for j, kv_j in enumerate(kv.unbind(2)):
                seg_states.append(S)
                S = carry[:, :, j, None, None] * S + kv_j
            St = torch.stack(seg_states, dim=2)
            o += (Qg @ St).mul_(qd[..., None])
            outs.append(o.reshape(B, H, seg.nb * seg.L, E))
            states.append(St)
        final = S if g is not None else None  # dg's last-token term needs it
        ctx.save_for_backward(q, k, v, slopes, doc_ids, torch.cat(states, dim=2), g, final)
        ctx.block, ctx.group, ctx.has_init = block, group, initial_state is not None
        ctx.state_dtype = initial_state.dtype if initial_state is not None else acc
        return torch.cat(outs, dim=2).to(q.dtype), S

    @staticmethod
    def backward(ctx, d_out, d_final):
        """With P = (Q K^T) * M and S_i the state entering block i:
        dQ = ((dO V^T) * M) K + (dO S_i^T) * qd
        dK = ((dO V^T) * M)^T Q + (V dS_{i+1}^T) * kd
        dV = P^T dO + (K * kd) dS_{i+1}
        dS_i = c dS_{i+1} + (Q * qd)^T dO,  swept from the last block back (dS_n = d_final).
        With per-token decays, dg comes from dq and dk afterwards (module docstring).
        """
        q, k, v, slopes, doc_ids, all_states, g, final = ctx.saved_tensors
        acc = all_states.dtype
        B, H, T, D = q.shape
        qa, ka, va = (x.to(acc) for x in (q, k, v))
        do = d_out.to(acc)
        tables = _Tables(slopes.to(acc), doc_ids, T, g.to(acc) if g is not None else None)
        dS = d_final.to(acc) if d_final is not None else torch.zeros_like(all_states[:, :, 0])
        dq, dk, dv = torch.empty_like(qa), torch.empty_like(ka), torch.empty_like(va)
        for seg in reversed(_segments(T, ctx.block, ctx.group)):
            M, qd, kd, carry = tables(seg)
            Qg, Kg, Vg, dOg = (_blocks(x, seg) for x in (qa, ka, va, do))
            St = all_states[:, :, seg.blk0 : seg.blk0 + seg.nb]
            dOq = dOg * qd[..., None]
            qdo = Qg.transpose(-1, -2) @ dOq
            dSn = [None] * seg.nb
            for j in reversed(range(seg.nb)):
                dSn[j] = dS
                dS = carry[:, :, j, None, None] * dS + qdo[:, :, j]
            dSn = torch.stack(dSn, dim=2)
            dP = (dOg @ Vg.transpose(-1, -2)).mul_(M)
            P = (Qg @ Kg.transpose(-1, -2)).mul_(M)
            # in-place accumulation: every fresh large tensor costs page faults on CPU
            dQg = dP @ Kg
            dQg += dOq @ St.transpose(-1, -2)
            dKg = dP.transpose(-1, -2) @ Qg
            dKg += (Vg * kd[..., None]) @ dSn.transpose(-1, -2)
            dVg = P.transpose(-1, -2) @ dOg
            dVg += (Kg @ dSn).mul_(kd[..., None])
            n = seg.nb * seg.L
            dq[:, :, seg.t0 : seg.t1] = dQg.reshape(B, H, n, D)
            dk[:, :, seg.t0 : seg.t1] = dKg.reshape(B, H, n, D)
            dv[:, :, seg.t0 : seg.t1] = dVg.reshape(B, H, n, -1)
        d_init = dS.to(ctx.state_dtype) if ctx.has_init else None
        dg = None
        if g is not None and ctx.needs_input_grad[8]:
            dg = token_decay_grad(qa, dq, ka, dk, final, d_final).to(g.dtype)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, d_init, None, None, dg


def chunk_state_weights(slopes_H, T: int, doc_ids=None, g=None, dtype=torch.float32):
    """kd_j, the weight of k_j^T v_j in the state a chunk of T tokens hands on from a zero
    start: lambda^(T-1-j), or exp(G_end - G_j) with per-token log-decays, 0 outside the
    chunk's last document. [B or 1, H, T] in ``dtype``. The PyTorch chunk state and the
    Triton chunk state's backward both use it."""
    if g is not None:
        G = (g.to(dtype) - slopes_H.to(dtype)[None, :, None]).cumsum(-1)
        kd = torch.exp(G[..., -1:] - G)
    else:
        t = torch.arange(T, device=slopes_H.device, dtype=dtype)
        kd = torch.exp(-slopes_H.to(dtype)[:, None] * (T - 1 - t))[None]
    if doc_ids is not None:
        kd = kd * (doc_ids == doc_ids[:, -1:]).to(dtype)[:, None]
    return kd


def token_decay_grad(q, dq, k, dk, final=None, d_final=None) -> torch.Tensor:
    """dL/dg [B, H, T] for per-token log-decays, from the gradients of q and k (any path):
    the reverse running sum of q_t . dq_t - k_t . dk_t, plus <dS_final, S_final> at the last
    token. Terms across a document border cancel in the sum (each document's operator depends
    on differences of G inside it), so no document table is needed. ``q``/``dq`` may be None
    (a chunk state has no queries)."""
    acc = torch.promote_types(dk.dtype, torch.float32)
    dG = -(k.to(acc) * dk.to(acc)).sum(-1)
    if q is not None:
        dG = dG + (q.to(acc) * dq.to(acc)).sum(-1)
    if d_final is not None:
        dG[..., -1] += (final.to(acc) * d_final.to(acc)).sum((-1, -2))
    return dG.flip(-1).cumsum(-1).flip(-1)


def lightning_attention_chunk(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHDE: torch.Tensor | None = None,
    return_state: bool = False,
    block: int = 64,
    group: int = 1024,
    g_BHT: torch.Tensor | None = None,
):
    """Returns o [B, H, T, E] (and the final state [B, H, D, E] if ``return_state``)."""
    out, state = _LightningChunk.apply(
        q_BHTD, k_BHTD, v_BHTE, slopes_H, doc_ids_BT, initial_state_BHDE, block, group, g_BHT
    )
    return (out, state) if return_state else out
