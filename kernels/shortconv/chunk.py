"""Short causal depthwise convolution in PyTorch: torch's conv1d when there are no document
boundaries; with boundaries, a sum over the K (small) shifted copies of the input, each masked
where the shifted token belongs to another document. Both O(T * C * K)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def short_conv_chunk(
    x_BTC: torch.Tensor,
    w_CK: torch.Tensor,
    bias_C: torch.Tensor | None = None,
    doc_ids_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    B, T, C = x_BTC.shape
    K = w_CK.shape[1]
    if doc_ids_BT is None:
        y = F.conv1d(F.pad(x_BTC.transpose(1, 2), (K - 1, 0)), w_CK[:, None, :], bias_C, groups=C)
        return y.transpose(1, 2)
    y = x_BTC * w_CK[:, K - 1]
    for lag in range(1, min(K, T)):
        same = (doc_ids_BT[:, lag:] == doc_ids_BT[:, :-lag]).to(x_BTC.dtype)[..., None]
        shifted = F.pad(x_BTC[:, :-lag] * same, (0, 0, lag, 0))
        y = y + shifted * w_CK[:, K - 1 - lag]
    return y if bias_C is None else y + bias_C
