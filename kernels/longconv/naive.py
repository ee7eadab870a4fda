"""Reference long causal convolution: y[t, c] = sum_{j <= t, same document} k[c, t - j] u[j, c],
computed as a direct O(T^2) sum (a lower-triangular Toeplitz product per channel)."""

from __future__ import annotations

import torch


def long_conv_naive(
    u_BTC: torch.Tensor, k_CL: torch.Tensor, doc_ids_BT: torch.Tensor | None = None
) -> torch.Tensor:
    dtype = torch.promote_types(u_BTC.dtype, torch.float32)
    u, k = u_BTC.to(dtype), k_CL.to(dtype)
    T = u.shape[1]
    t = torch.arange(T, device=u.device)
    lag = t[:, None] - t[None, :]  # [T, T]
    toeplitz = k[:, lag.clamp(min=0)] * (lag >= 0).to(dtype)  # [C, T, T]
    if doc_ids_BT is None:
        y = torch.einsum("ctj,bjc->btc", toeplitz, u)
    else:
        same = (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]).to(dtype)  # [B, T, T]
        y = torch.einsum("ctj,btj,bjc->btc", toeplitz, same, u)
    return y.to(u_BTC.dtype)
