"""Short causal depthwise convolution in PyTorch, with or without document boundaries.

    y[b, t, c] = sum_{lag < K} w[c, K - 1 - lag] x[b, t - lag, c]   (terms inside the document)

An explicit autograd.Function: the forward is K in-place multiply-adds over shifted slices of
x (no padded copies), and a document boundary only removes the few terms that cross it, the
first K - 1 tokens of each document (``_cross_terms``), from that unmasked sum. The backward is
the same sums transposed, with the same few corrections. Before this, the path with documents
summed K masked, padded copies of x under autograd (~25 full-size element-wise operations
forward and backward), and the path without them was torch's depthwise conv1d on a transposed
copy; at based-25m's C layer (8K tokens, 1024 channels, K 3, 9 documents) forward + backward
took 244 ms with documents and 124 without.
"""

from __future__ import annotations

import torch


def _cross_terms(doc_ids_BT: torch.Tensor | None, K: int):
    """(target, source, tap) index tensors over the flattened [B * T] tokens: every term
    x[source] * w[:, tap] of the unmasked sum whose source lies in an earlier document than
    its target. Only the first K - 1 tokens of a document have any."""
    if doc_ids_BT is None or min(K, doc_ids_BT.shape[1]) == 1:
        return None
    B, T = doc_ids_BT.shape
    targets, sources, taps = [], [], []
    for lag in range(1, min(K, T)):
        cross = doc_ids_BT[:, lag:] != doc_ids_BT[:, :-lag]  # [B, T - lag]: target t = lag + i
        b, i = cross.nonzero(as_tuple=True)
        tgt = b * T + i + lag
        targets.append(tgt)
        sources.append(tgt - lag)
        taps.append(torch.full_like(tgt, K - 1 - lag))
    tgt, src, tap = torch.cat(targets), torch.cat(sources), torch.cat(taps)
    return (tgt, src, tap) if tgt.numel() else None


class _ShortConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, doc_ids):
        B, T, C = x.shape
        K = w.shape[1]
        y = x * w[:, K - 1]
        for lag in range(1, min(K, T)):
            y[:, lag:].addcmul_(x[:, :-lag], w[:, K - 1 - lag])
        cross = _cross_terms(doc_ids, K)
        if cross is not None:
            tgt, src, tap = cross
            flat = y.view(B * T, C)
            flat.index_add_(0, tgt, x.reshape(B * T, C)[src] * w.t()[tap], alpha=-1)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, w)
        ctx.cross, ctx.has_bias = cross, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        B, T, C = x.shape
        K = w.shape[1]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        dx = dw = None
        if need_x:
            dx = dy * w[:, K - 1]
            for lag in range(1, min(K, T)):
                dx[:, :-lag].addcmul_(dy[:, lag:], w[:, K - 1 - lag])
        if need_w:
            dw = torch.zeros_like(w)
            for lag in range(min(K, T)):
                dw[:, K - 1 - lag] = _dot(dy[:, lag:], x[:, : T - lag])
        if ctx.cross is not None:
            tgt, src, tap = ctx.cross
            dy_t = dy.view(B * T, C)[tgt]
            if need_x:
                dx.view(B * T, C).index_add_(0, src, dy_t * w.t()[tap], alpha=-1)
            if need_w:
                x_s = x.reshape(B * T, C)[src]
                dw -= torch.zeros_like(w.t()).index_add_(0, tap, dy_t * x_s).t()
        dbias = dy.sum((0, 1)) if ctx.has_bias and need_b else None
        return dx, dw, dbias, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over (batch, time) of a * b: [B, T, C] x [B, T, C] -> [C]."""
    return (a * b).sum((0, 1))


def short_conv_chunk(
    x_BTC: torch.Tensor,
    w_CK: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    doc_ids_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [B, T, C] (module docstring); x [B, T, C], w [C, K], bias [C], doc_ids [B, T]."""
    return _ShortConv.apply(x_BTC, w_CK, bias_C, doc_ids_BT)
