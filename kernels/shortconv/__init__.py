"""Short causal depthwise convolution (Based's gated-convolution layers).

``short_conv`` is the one entry point (Triton on CUDA, PyTorch otherwise);
``short_conv_step`` is the recurrent form for generation, whose state is the last K - 1 inputs.
"""

from __future__ import annotations

import torch

from plait.kernels.docs import resolve_doc_ids

from .chunk import short_conv_chunk
from .naive import short_conv_naive

__all__ = ["short_conv", "short_conv_chunk", "short_conv_naive", "short_conv_step"]


def short_conv(
    x_BTC: torch.Tensor,
    w_CK: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y[b,t,c] = sum_i w[c,i] x[b, t-K+1+i, c] (+ bias), within each document."""
    if x_BTC.dim() != 3 or w_CK.dim() != 2 or w_CK.shape[0] != x_BTC.shape[2]:
        raise ValueError(
            f"short_conv: x {tuple(x_BTC.shape)}, w {tuple(w_CK.shape)}; "
            "expected x [B,T,C], w [C,K]"
        )
    B, T, _ = x_BTC.shape
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if backend == "auto":
        backend = "triton" if x_BTC.is_cuda else "chunk"
    if backend == "naive":
        return short_conv_naive(x_BTC, w_CK, bias_C, docs)
    if backend == "chunk":
        return short_conv_chunk(x_BTC, w_CK, bias_C, docs)
    if backend == "triton":
        from .triton import short_conv_triton

        return short_conv_triton(x_BTC, w_CK, bias_C, docs)
    raise ValueError(f"short_conv: backend {backend!r} not in ('auto', 'naive', 'chunk', 'triton')")


def short_conv_step(
    x_BC: torch.Tensor,
    w_CK: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    state_BKC: torch.Tensor | None = None,
):
    """One token: state holds the previous K - 1 inputs [B, K-1, C]. Returns (y, state)."""
    B, C = x_BC.shape
    K = w_CK.shape[1]
    if state_BKC is None:
        state_BKC = x_BC.new_zeros(B, K - 1, C)
    window = torch.cat([state_BKC, x_BC[:, None]], dim=1)  # [B, K, C]
    y = (window * w_CK.t()[None]).sum(1)
    if bias_C is not None:
        y = y + bias_C
    return y, window[:, 1:]
