"""Triton kernels for lightning attention (forward and backward), the fast path on CUDA.

One program per (batch, head) sweeps the sequence block by block, keeping the D x E state
in registers in float32 (Lightning Attention-2's inter-block recurrence fused with the
intra-block masked product). The tables are those of chunk.py: decay mask M, query decay
qd, key decay kd and carry c, each zeroed across document boundaries; the last block is
masked, not padded, so the final state is exact. Backward: one forward sweep for dQ (which
needs the state entering each block) and one reverse sweep for dK, dV (which needs the state
gradient leaving each block).

Precision: tiles are upcast to float32 after loading (bf16 dots are silently wrong in the
Triton interpreter, which is how CI runs these kernels on CPU); ``tl.dot`` runs in IEEE fp32
for fp32 inputs and TF32 for bf16/fp16 inputs (whose own precision is lower).
Head dims are padded to a power of two >= 16 with masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tables(s, offs_c, start, T, doc_ptr, HAS_DOCS: tl.constexpr):
    tmask = start + offs_c < T
    L = tl.minimum(T - start, offs_c.shape[0])
    pos = tl.cast(offs_c, tl.float32)
    Lf = tl.cast(L, tl.float32)
    diff = pos[:, None] - pos[None, :]
    M = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
    qd = tl.exp(-s * (pos + 1.0))
    kd = tl.where(tmask, tl.exp(-s * tl.maximum(Lf - 1.0 - pos, 0.0)), 0.0)
    carry = tl.exp(-s * Lf)
    if HAS_DOCS:
        d = tl.load(doc_ptr + start + offs_c, mask=tmask, other=-1)
        prev = tl.load(doc_ptr + tl.maximum(start - 1, 0))
        end = tl.load(doc_ptr + start + L - 1)
        M = tl.where(d[:, None] == d[None, :], M, 0.0)
        qd = tl.where(d == prev, qd, 0.0)
        kd = tl.where(d == end, kd, 0.0)
        carry = tl.where(prev == end, carry, 0.0)
    return tmask, M, qd, kd, carry


@triton.jit
def _load(ptr, offs_c, offs_f, start, T, F, stride_t):
    m = (start + offs_c < T)[:, None] & (offs_f < F)[None, :]
    x = tl.load(ptr + (start + offs_c)[:, None] * stride_t + offs_f[None, :], mask=m, other=0.0)
    return x.to(tl.float32), m


@triton.jit
def _fwd_kernel(
    Q, K, V, O, SLOPES, DOC, S_INIT, S_FINAL,
    T, H, D, E,
    HAS_DOCS: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.load(SLOPES + h).to(tl.float32)
    offs_c = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    q_ptr, k_ptr = Q + pid * T * D, K + pid * T * D
    v_ptr, o_ptr = V + pid * T * E, O + pid * T * E
    doc_ptr = DOC + b * T
    smask = (offs_d < D)[:, None] & (offs_e < E)[None, :]
    s_off = pid * D * E + offs_d[:, None] * E + offs_e[None, :]
    S = tl.zeros((BD, BE), dtype=tl.float32)
    if HAS_INIT:
        S = tl.load(S_INIT + s_off, mask=smask, other=0.0).to(tl.float32)
    for start in range(0, T, BLOCK):
        tmask, M, qd, kd, carry = _tables(s, offs_c, start, T, doc_ptr, HAS_DOCS)
        q, _ = _load(q_ptr, offs_c, offs_d, start, T, D, D)
        k, _ = _load(k_ptr, offs_c, offs_d, start, T, D, D)
        v, vm = _load(v_ptr, offs_c, offs_e, start, T, E, E)
        scores = tl.dot(q, tl.trans(k), input_precision=PREC) * M
        o = tl.dot(scores, v, input_precision=PREC)
        o += tl.dot(q * qd[:, None], S, input_precision=PREC)
        tl.store(
            o_ptr + (start + offs_c)[:, None] * E + offs_e[None, :],
            o.to(O.dtype.element_ty), mask=vm,
        )  # fmt: skip
        S = carry * S + tl.dot(tl.trans(k * kd[:, None]), v, input_precision=PREC)
    tl.store(S_FINAL + s_off, S, mask=smask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, SLOPES, DOC, S_INIT,
    T, H, D, E,
    HAS_DOCS: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.load(SLOPES + h).to(tl.float32)
    offs_c = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    k_ptr, dq_ptr = K + pid * T * D, DQ + pid * T * D
    v_ptr, do_ptr = V + pid * T * E, DO + pid * T * E
    doc_ptr = DOC + b * T
    smask = (offs_d < D)[:, None] & (offs_e < E)[None, :]
    S = tl.zeros((BD, BE), dtype=tl.float32)
    if HAS_INIT:
        s_off = pid * D * E + offs_d[:, None] * E + offs_e[None, :]
        S = tl.load(S_INIT + s_off, mask=smask, other=0.0).to(tl.float32)
    for start in range(0, T, BLOCK):
        tmask, M, qd, kd, carry = _tables(s, offs_c, start, T, doc_ptr, HAS_DOCS)
        k, km = _load(k_ptr, offs_c, offs_d, start, T, D, D)
        v, _ = _load(v_ptr, offs_c, offs_e, start, T, E, E)
        do, _ = _load(do_ptr, offs_c, offs_e, start, T, E, E)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC) * M
        dq = tl.dot(dp, k, input_precision=PREC)
        dq += tl.dot(do, tl.trans(S), input_precision=PREC) * qd[:, None]
        tl.store(
            dq_ptr + (start + offs_c)[:, None] * D + offs_d[None, :],
            dq.to(DQ.dtype.element_ty), mask=km,
        )  # fmt: skip
        S = carry * S + tl.dot(tl.trans(k * kd[:, None]), v, input_precision=PREC)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, SLOPES, DOC, DS_FINAL, DS_INIT,
    T, H, D, E,
    HAS_DOCS: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
    PREC: tl.constexpr, BLOCK: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    s = tl.load(SLOPES + h).to(tl.float32)
    offs_c = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    q_ptr, k_ptr, dk_ptr = Q + pid * T * D, K + pid * T * D, DK + pid * T * D
    v_ptr, do_ptr, dv_ptr = V + pid * T * E, DO + pid * T * E, DV + pid * T * E
    doc_ptr = DOC + b * T
    smask = (offs_d < D)[:, None] & (offs_e < E)[None, :]
    s_off = pid * D * E + offs_d[:, None] * E + offs_e[None, :]
    dS = tl.zeros((BD, BE), dtype=tl.float32)
    if HAS_DFINAL:
        dS = tl.load(DS_FINAL + s_off, mask=smask, other=0.0).to(tl.float32)
    n_blocks = tl.cdiv(T, BLOCK)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK
        tmask, M, qd, kd, carry = _tables(s, offs_c, start, T, doc_ptr, HAS_DOCS)
        q, _ = _load(q_ptr, offs_c, offs_d, start, T, D, D)
        k, km = _load(k_ptr, offs_c, offs_d, start, T, D, D)
        v, vm = _load(v_ptr, offs_c, offs_e, start, T, E, E)
        do, _ = _load(do_ptr, offs_c, offs_e, start, T, E, E)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC) * M
        p = tl.dot(q, tl.trans(k), input_precision=PREC) * M
        dk = tl.dot(tl.trans(dp), q, input_precision=PREC)
        dk += tl.dot(v, tl.trans(dS), input_precision=PREC) * kd[:, None]
        dv = tl.dot(tl.trans(p), do, input_precision=PREC)
        dv += tl.dot(k * kd[:, None], dS, input_precision=PREC)
        tl.store(
            dk_ptr + (start + offs_c)[:, None] * D + offs_d[None, :],
            dk.to(DK.dtype.element_ty), mask=km,
        )  # fmt: skip
        tl.store(
            dv_ptr + (start + offs_c)[:, None] * E + offs_e[None, :],
            dv.to(DV.dtype.element_ty), mask=vm,
        )  # fmt: skip
        dS = carry * dS + tl.dot(tl.trans(q * qd[:, None]), do, input_precision=PREC)
    if HAS_INIT:
        tl.store(DS_INIT + s_off, dS, mask=smask)


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _meta(q, v, block):
    B, H, T, D = q.shape
    E = v.shape[-1]
    if block < 16 or block & (block - 1):
        raise ValueError(
            f"lightning_attention (triton): block must be a power of two >= 16, got {block}"
        )
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return B, H, T, D, E, dict(PREC=prec, BLOCK=block, BD=_pad(D), BE=_pad(E))


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, doc_ids, initial_state, block):
        q, k, v = (x.contiguous() for x in (q, k, v))
        B, H, T, D, E, meta = _meta(q, v, block)
        slopes32 = slopes.to(device=q.device, dtype=torch.float32).contiguous()
        docs = doc_ids.contiguous() if doc_ids is not None else q.new_zeros(1, dtype=torch.int64)
        init = (
            initial_state.to(torch.float32).contiguous()
            if initial_state is not None
            else q.new_zeros(1, dtype=torch.float32)
        )
        o = torch.empty(B, H, T, E, device=q.device, dtype=q.dtype)
        final = torch.empty(B, H, D, E, device=q.device, dtype=torch.float32)
        _fwd_kernel[(B * H,)](
            q, k, v, o, slopes32, docs, init, final, T, H, D, E,
            HAS_DOCS=doc_ids is not None, HAS_INIT=initial_state is not None, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, slopes32, docs, init)
        ctx.has_docs, ctx.has_init, ctx.block = (
            doc_ids is not None,
            initial_state is not None,
            block,
        )
        ctx.init_dtype = initial_state.dtype if initial_state is not None else None
        return o, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, slopes32, docs, init = ctx.saved_tensors
        B, H, T, D, E, meta = _meta(q, v, ctx.block)
        do = d_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dfinal = (
            d_final.to(torch.float32).contiguous()
            if d_final is not None
            else q.new_zeros(1, dtype=torch.float32)
        )
        dinit = (
            torch.empty(B, H, D, E, device=q.device, dtype=torch.float32)
            if ctx.has_init
            else dfinal
        )
        _bwd_dq_kernel[(B * H,)](
            q, k, v, do, dq, slopes32, docs, init, T, H, D, E,
            HAS_DOCS=ctx.has_docs, HAS_INIT=ctx.has_init, **meta,
        )  # fmt: skip
        _bwd_dkdv_kernel[(B * H,)](
            q, k, v, do, dk, dv, slopes32, docs, dfinal, dinit, T, H, D, E,
            HAS_DOCS=ctx.has_docs, HAS_DFINAL=d_final is not None, HAS_INIT=ctx.has_init, **meta,
        )  # fmt: skip
        d_init = dinit.to(ctx.init_dtype) if ctx.has_init else None
        return dq, dk, dv, None, None, d_init, None


def lightning_attention_triton(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHDE: torch.Tensor | None = None,
    return_state: bool = False,
    block: int = 64,
):
    out, state = _LightningTriton.apply(
        q_BHTD, k_BHTD, v_BHTE, slopes_H, doc_ids_BT, initial_state_BHDE, block
    )
    return (out, state) if return_state else out
