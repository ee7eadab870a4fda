"""Reference short causal depthwise convolution, written as a loop over the taps.

    y[b, t, c] = sum_i w[c, i] * x[b, t - K + 1 + i, c]     (terms in the same document only)

The tap order is torch.nn.Conv1d's with left padding K - 1 (w[c, K-1] meets the current
token), so Conv1d weights [C, 1, K] map over as ``weight[:, 0]``.
"""

from __future__ import annotations

import torch


def short_conv_naive(
    x_BTC: torch.Tensor,
    w_CK: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    doc_ids_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    dtype = torch.promote_types(x_BTC.dtype, torch.float32)
    x, w = x_BTC.to(dtype), w_CK.to(dtype)
    B, T, C = x.shape
    K = w.shape[1]
    y = torch.zeros_like(x)
    for t in range(T):
        for i in range(K):
            src = t - K + 1 + i
            if src < 0:
                continue
            term = w[:, i] * x[:, src]
            if doc_ids_BT is not None:
                term = term * (doc_ids_BT[:, src] == doc_ids_BT[:, t]).to(dtype)[:, None]
            y[:, t] = y[:, t] + term
    if bias_C is not None:
        y = y + bias_C.to(dtype)
    return y.to(x_BTC.dtype)
