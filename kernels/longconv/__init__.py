"""Long causal convolutions (H3's SSMs applied as convolutions) and their SSM kernels."""

from __future__ import annotations

import torch

from plait.kernels.docs import resolve_doc_ids

from .fft import long_conv_fft
from .naive import long_conv_naive
from .ssm import (
    diag_ssm_kernel,
    diag_ssm_step,
    discretise,
    shift_ssm_kernel,
    shift_ssm_step,
    vandermonde,
)

__all__ = [
    "diag_ssm_kernel",
    "diag_ssm_step",
    "discretise",
    "long_conv",
    "long_conv_fft",
    "long_conv_naive",
    "shift_ssm_kernel",
    "shift_ssm_step",
    "vandermonde",
]


def long_conv(
    u_BTC: torch.Tensor,
    k_CL: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y[b,t,c] = sum_{j<=t} k[c, t-j] u[b,j,c] within each document; k is [C, L >= 1]
    (lags beyond L are zero). ``auto`` and ``fft`` use torch.fft on any device."""
    if u_BTC.dim() != 3 or k_CL.dim() != 2 or k_CL.shape[0] != u_BTC.shape[2]:
        raise ValueError(
            f"long_conv: u {tuple(u_BTC.shape)}, k {tuple(k_CL.shape)}; expected u [B,T,C], k [C,L]"
        )
    B, T, _ = u_BTC.shape
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if backend == "naive":
        k = k_CL[:, :T]
        if k.shape[1] < T:
            k = torch.nn.functional.pad(k, (0, T - k.shape[1]))
        return long_conv_naive(u_BTC, k, docs)
    if backend in ("auto", "fft"):
        return long_conv_fft(u_BTC, k_CL, docs)
    raise ValueError(f"long_conv: backend {backend!r} not in ('auto', 'naive', 'fft')")
