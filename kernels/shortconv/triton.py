"""Triton short causal depthwise convolution, forward and backward.

Each program owns a tile of BT tokens x BC channels of one batch row and loops over the K taps
(K is a compile-time constant, e.g. 3 or 4). Backward: dx is the anti-causal convolution of dy
with the same taps; dw is reduced per tile into a [tiles, C, K] buffer and summed by torch
(no atomics, so the result is deterministic). Tiles are upcast to float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _same_doc(DOC, b, T, offs_t, src, HAS_DOCS: tl.constexpr):
    ok = (src >= 0) & (src < T) & (offs_t < T)
    if HAS_DOCS:
        d_t = tl.load(DOC + b * T + offs_t, mask=offs_t < T, other=-1)
        d_s = tl.load(DOC + b * T + src, mask=ok, other=-2)
        ok = ok & (d_t == d_s)
    return ok


@triton.jit
def _fwd(X, W, BIAS, Y, DOC, T, C, K: tl.constexpr, HAS_BIAS: tl.constexpr,
         HAS_DOCS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_c * BC + tl.arange(0, BC)
    cmask = offs_c < C
    acc = tl.zeros((BT, BC), tl.float32)
    for i in tl.static_range(K):
        src = offs_t - (K - 1) + i
        ok = _same_doc(DOC, b, T, offs_t, src, HAS_DOCS)
        x = tl.load(X + b * T * C + src[:, None] * C + offs_c[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        w = tl.load(W + offs_c * K + i, mask=cmask, other=0.0).to(tl.float32)
        acc += x * w[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    m = (offs_t < T)[:, None] & cmask[None, :]
    tl.store(
        Y + b * T * C + offs_t[:, None] * C + offs_c[None, :], acc.to(Y.dtype.element_ty), mask=m
    )


@triton.jit
def _bwd(X, W, DY, DX, DW_PART, DOC, T, C, K: tl.constexpr, HAS_DOCS: tl.constexpr,
         BT: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_t = tl.num_programs(0)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = pid_c * BC + tl.arange(0, BC)
    cmask = offs_c < C
    tmask = offs_t < T
    dy = tl.load(DY + b * T * C + offs_t[:, None] * C + offs_c[None, :],
                 mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
    dx = tl.zeros((BT, BC), tl.float32)
    part = DW_PART + (b * n_t + pid_t) * C * K
    for i in tl.static_range(K):
        w = tl.load(W + offs_c * K + i, mask=cmask, other=0.0).to(tl.float32)
        # dw[c, i] += sum_t dy[t] x[t - K + 1 + i]
        src = offs_t - (K - 1) + i
        ok = _same_doc(DOC, b, T, offs_t, src, HAS_DOCS)
        x = tl.load(X + b * T * C + src[:, None] * C + offs_c[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        tl.store(part + offs_c * K + i, tl.sum(dy * x, 0), mask=cmask)
        # dx[t] += w[c, i] dy[t + K - 1 - i]   (t is the source of output t + K - 1 - i)
        dst = offs_t + (K - 1) - i
        ok2 = _same_doc(DOC, b, T, dst, offs_t, HAS_DOCS) & (dst < T)
        dyd = tl.load(DY + b * T * C + dst[:, None] * C + offs_c[None, :],
                      mask=ok2[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        dx += dyd * w[None, :]
    m = tmask[:, None] & cmask[None, :]
    tl.store(
        DX + b * T * C + offs_t[:, None] * C + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=m
    )


def _grid(B, T, C, BT, BC):
    return (triton.cdiv(T, BT), triton.cdiv(C, BC), B)


class _ShortConvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, doc_ids, BT, BC):
        x, w = x.contiguous(), w.contiguous()
        B, T, C = x.shape
        K = w.shape[1]
        docs = doc_ids.contiguous() if doc_ids is not None else x.new_zeros(1, dtype=torch.int64)
        y = torch.empty_like(x)
        b_arg = bias.contiguous() if bias is not None else w
        _fwd[_grid(B, T, C, BT, BC)](x, w, b_arg, y, docs, T, C, K=K, HAS_BIAS=bias is not None,
                                      HAS_DOCS=doc_ids is not None, BT=BT, BC=BC)  # fmt: skip
        ctx.save_for_backward(x, w, docs)
        ctx.has_bias, ctx.has_docs, ctx.BT, ctx.BC = bias is not None, doc_ids is not None, BT, BC
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, docs = ctx.saved_tensors
        B, T, C = x.shape
        K = w.shape[1]
        grid = _grid(B, T, C, ctx.BT, ctx.BC)
        dx = torch.empty_like(x)
        part = torch.zeros(B * grid[0], C, K, device=x.device, dtype=torch.float32)
        _bwd[grid](x, w, dy.contiguous(), dx, part, docs, T, C, K=K, HAS_DOCS=ctx.has_docs,
                   BT=ctx.BT, BC=ctx.BC)  # fmt: skip
        dw = part.sum(0).to(w.dtype)
        db = dy.float().sum((0, 1)).to(w.dtype) if ctx.has_bias else None
        return dx, dw, db, None, None, None


def short_conv_triton(x, w, bias=None, doc_ids=None, BT: int = 32, BC: int = 32):
    return _ShortConvTriton.apply(x, w, bias, doc_ids, BT, BC)
