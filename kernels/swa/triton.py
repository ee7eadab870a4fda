"""Triton sliding-window attention (FlashAttention-style), forward and backward.

Forward: one program per (query block, batch x head) runs an online softmax over the key
blocks that can fall inside the window, [q_start - w + 1, q_end), and saves the row
log-sum-exp. Backward recomputes the probabilities from it: one kernel per query block for
dQ, one per key block for dK, dV (looping over the query blocks whose windows reach it).
Work and memory are O(T * w). Masked scores are -1e30 (finite), so a block that a row cannot
see contributes exactly zero once the row's own key has been seen. Tiles are upcast to
float32 after loading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG = -1.0e30


@triton.jit
def _mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS: tl.constexpr):
    dist = offs_m[:, None] - offs_n[None, :]
    m = (dist >= 0) & (dist < window) & (offs_n[None, :] < T) & (offs_m[:, None] < T)
    if HAS_DOCS:
        dq = tl.load(doc_ptr + offs_m, mask=offs_m < T, other=-1)
        dk = tl.load(doc_ptr + offs_n, mask=offs_n < T, other=-2)
        m = m & (dq[:, None] == dk[None, :])
    return m


@triton.jit
def _tile(ptr, offs, offs_f, T, F):
    m = (offs < T)[:, None] & (offs_f < F)[None, :]
    return tl.load(ptr + offs[:, None] * F + offs_f[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _fwd(
    Q, K, V, O, LSE, DOC, T, H, D, E, window, scale,
    HAS_DOCS: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    doc_ptr = DOC + (bh // H) * T
    q = _tile(Q + bh * T * D, offs_m, offs_d, T, D)
    m_i = tl.full((BM,), NEG, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BE), tl.float32)
    lo = tl.maximum(start_m - window + 1, 0) // BN * BN
    hi = tl.minimum(start_m + BM, T)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = _tile(K + bh * T * D, offs_n, offs_d, T, D)
        v = _tile(V + bh * T * E, offs_n, offs_e, T, E)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(_mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS), s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    om = (offs_m < T)[:, None] & (offs_e < E)[None, :]
    o_ptrs = O + bh * T * E + offs_m[:, None] * E + offs_e[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=om)
    tl.store(LSE + bh * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, DOC, T, H, D, E, window, scale,
    HAS_DOCS: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    doc_ptr = DOC + (bh // H) * T
    q = _tile(Q + bh * T * D, offs_m, offs_d, T, D)
    do = _tile(DO + bh * T * E, offs_m, offs_e, T, E)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros((BM, BD), tl.float32)
    lo = tl.maximum(start_m - window + 1, 0) // BN * BN
    hi = tl.minimum(start_m + BM, T)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = _tile(K + bh * T * D, offs_n, offs_d, T, D)
        v = _tile(V + bh * T * E, offs_n, offs_e, T, E)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        mask = _mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS)
        p = tl.where(mask, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PREC) * scale
    qm = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    tl.store(
        DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qm
    )


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, DOC, T, H, D, E, window, scale,
    HAS_DOCS: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    start_n = tl.program_id(0) * BN
    bh = tl.program_id(1)
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    doc_ptr = DOC + (bh // H) * T
    k = _tile(K + bh * T * D, offs_n, offs_d, T, D)
    v = _tile(V + bh * T * E, offs_n, offs_e, T, E)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BE), tl.float32)
    lo = start_n // BM * BM
    hi = tl.minimum(start_n + BN + window - 1, T)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        q = _tile(Q + bh * T * D, offs_m, offs_d, T, D)
        do = _tile(DO + bh * T * E, offs_m, offs_e, T, E)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        mask = _mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS)
        p = tl.where(mask, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
    km = (offs_n < T)[:, None] & (offs_d < D)[None, :]
    vm = (offs_n < T)[:, None] & (offs_e < E)[None, :]
    tl.store(
        DK + bh * T * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=km
    )
    tl.store(
        DV + bh * T * E + offs_n[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty), mask=vm
    )


def _meta(q, v, block):
    if block < 16 or block & (block - 1):
        raise ValueError(f"swa (triton): block must be a power of two >= 16, got {block}")
    pad = lambda n: max(16, triton.next_power_of_2(n))  # noqa: E731
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(PREC=prec, BM=block, BN=block, BD=pad(q.shape[-1]), BE=pad(v.shape[-1]))


class _SwaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, doc_ids, scale, block):
        q, k, v = (x.contiguous() for x in (q, k, v))
        B, H, T, D = q.shape
        E = v.shape[-1]
        meta = _meta(q, v, block)
        docs = doc_ids.contiguous() if doc_ids is not None else q.new_zeros(1, dtype=torch.int64)
        o = torch.empty(B, H, T, E, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(T, block), B * H)
        _fwd[grid](q, k, v, o, lse, docs, T, H, D, E, window, scale,
                   HAS_DOCS=doc_ids is not None, **meta)  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, docs)
        ctx.window, ctx.scale, ctx.block, ctx.has_docs = window, scale, block, doc_ids is not None
        return o

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, o, lse, docs = ctx.saved_tensors
        B, H, T, D = q.shape
        E = v.shape[-1]
        meta = _meta(q, v, ctx.block)
        do = d_out.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grid = (triton.cdiv(T, ctx.block), B * H)
        args = (T, H, D, E, ctx.window, ctx.scale)
        _bwd_dq[grid](q, k, v, do, dq, lse, delta, docs, *args, HAS_DOCS=ctx.has_docs, **meta)
        _bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, docs, *args, HAS_DOCS=ctx.has_docs, **meta)
        return dq, dk, dv, None, None, None, None


def swa_triton(q, k, v, window, doc_ids=None, scale=None, block: int = 64):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _SwaTriton.apply(q, k, v, window, doc_ids, float(scale), block)
