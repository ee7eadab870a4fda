"""Triton short causal depthwise convolution, forward and backward.

Forward: each program owns a tile of BT tokens x BC channels of one batch row and loops over
the K taps (K is a compile-time constant, e.g. 3 or 4). Backward: one program per BC channels
x batch row x span of SPAN tokens sweeps its span in BT-token tiles; dx is the anti-causal
convolution of dy with the same taps, and dw is accumulated in registers across the tiles
([BC, K] float32) and written once per program into a [B * spans, C, K] buffer that torch
sums: no atomics (deterministic), and the buffer is C * K floats per SPAN tokens, not per tile
(24 MB at 1M tokens, C = 2048, K = 3, where per-tile partials took 768 MB). Tiles are upcast
to float32; base offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.kernels.triton_common import check_device, on_device, prepare_doc_ids

SPAN = 1024  # tokens per backward program


@triton.jit
def _same_doc(DOC, b, T, offs_t, src, HAS_DOCS: tl.constexpr):
    ok = (src >= 0) & (src < T) & (offs_t < T)
    if HAS_DOCS:
        d_t = tl.load(DOC + b * T + offs_t, mask=offs_t < T, other=-1)
        d_s = tl.load(DOC + b * T + src, mask=ok, other=-2)
        ok = ok & (d_t == d_s)
    return ok


@triton.jit(do_not_specialize=["T"])
def _fwd(X, W, BIAS, Y, DOC, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
         HAS_DOCS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t, pid_c = tl.program_id(0), tl.program_id(1)
    b = tl.cast(tl.program_id(2), tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_c * BC + tl.arange(0, BC)
    cmask = offs_c < C
    x_ptr = X + b * T * C
    acc = tl.zeros((BT, BC), tl.float32)
    for i in tl.static_range(K):
        src = offs_t - (K - 1) + i
        ok = _same_doc(DOC, b, T, offs_t, src, HAS_DOCS)
        x = tl.load(x_ptr + src[:, None] * C + offs_c[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        w = tl.load(W + offs_c * K + i, mask=cmask, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    m = (offs_t < T)[:, None] & cmask[None, :]
    tl.store(
        Y + b * T * C + offs_t[:, None] * C + offs_c[None, :], acc.to(Y.dtype.element_ty), mask=m
    )


@triton.jit(do_not_specialize=["T"])
def _bwd(X, W, DY, DX, DW_PART, DOC, T, C, K: tl.constexpr, KP: tl.constexpr,
         HAS_DOCS: tl.constexpr, SPAN: tl.constexpr,
         BT: tl.constexpr, BC: tl.constexpr):
    pid_c, b, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_s = tl.num_programs(2)
    b64 = tl.cast(b, tl.int64)
    offs_c = pid_c * BC + tl.arange(0, BC)
    offs_k = tl.arange(0, KP)
    cmask = offs_c < C
    x_ptr, dy_ptr, dx_ptr = X + b64 * T * C, DY + b64 * T * C, DX + b64 * T * C
    dw = tl.zeros((BC, KP), tl.float32)
    for t0 in range(pid_s * SPAN, tl.minimum(pid_s * SPAN + SPAN, T), BT):
        offs_t = t0 + tl.arange(0, BT)
        tmask = offs_t < T
        dy = tl.load(dy_ptr + offs_t[:, None] * C + offs_c[None, :],
                     mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        dx = tl.zeros((BT, BC), tl.float32)
        for i in tl.static_range(K):
            w = tl.load(W + offs_c * K + i, mask=cmask, other=0.0).to(tl.float32)
            # dw[c, i] += sum_t dy[t] x[t - K + 1 + i]
            src = offs_t - (K - 1) + i
            ok = _same_doc(DOC, b64, T, offs_t, src, HAS_DOCS)
            x = tl.load(x_ptr + src[:, None] * C + offs_c[None, :],
                        mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            dw += tl.where(offs_k[None, :] == i, tl.sum(dy * x, 0)[:, None], 0.0)
            # dx[t] += w[c, i] dy[t + K - 1 - i]   (t is the source of output t + K - 1 - i)
            dst = offs_t + (K - 1) - i
            ok2 = _same_doc(DOC, b64, T, dst, offs_t, HAS_DOCS) & (dst < T)
            dyd = tl.load(dy_ptr + dst[:, None] * C + offs_c[None, :],
                          mask=ok2[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            dx += dyd * w[None, :]
        m = tmask[:, None] & cmask[None, :]
        tl.store(dx_ptr + offs_t[:, None] * C + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=m)
    part = DW_PART + (b64 * n_s + pid_s) * C * K
    pm = cmask[:, None] & (offs_k < K)[None, :]
    tl.store(part + offs_c[:, None] * K + offs_k[None, :], dw, mask=pm)


class _ShortConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, doc_ids, BT, BC):
        x, w = x.contiguous(), w.contiguous()
        B, T, C = x.shape
        K = w.shape[1]
        docs = prepare_doc_ids(doc_ids, x, "short_conv")
        y = torch.empty_like(x)
        b_arg = bias.contiguous() if bias is not None else w
        with on_device(x):
            _fwd[(triton.cdiv(T, BT), triton.cdiv(C, BC), B)](
                x, w, b_arg, y, docs, T, C, K=K, HAS_BIAS=bias is not None,
                HAS_DOCS=doc_ids is not None, BT=BT, BC=BC,
            )
        ctx.save_for_backward(x, w, docs)
        ctx.has_bias, ctx.has_docs, ctx.BT, ctx.BC = bias is not None, doc_ids is not None, BT, BC
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, docs = ctx.saved_tensors
        B, T, C = x.shape
        K = w.shape[1]
        n_s = triton.cdiv(T, SPAN)
        with on_device(x):
            dx = torch.empty_like(x)
            part = torch.empty(B * n_s, C, K, device=x.device, dtype=torch.float32)
            _bwd[(triton.cdiv(C, ctx.BC), B, n_s)](
                x, w, dy.contiguous(), dx, part, docs, T, C, K=K, KP=triton.next_power_of_2(K),
                HAS_DOCS=ctx.has_docs, SPAN=SPAN, BT=ctx.BT, BC=ctx.BC,
            )
            dw = part.sum(0).to(w.dtype)
            db = dy.float().sum((0, 1)).to(w.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None


def short_conv_triton(x, w, bias=None, doc_ids=None, BT: int = 32, BC: int = 32):
    check_device(x, w, what="short_conv")
    return _ShortConvTriton.apply(x, w, bias, doc_ids, BT, BC)
