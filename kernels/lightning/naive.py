"""Reference causal linear attention with per-head exponential decay.

    o_t = sum_{j <= t} lambda_h^(t - j) (q_t . k_j) v_j,   lambda_h = exp(-s_h), s_h >= 0

Written as one masked quadratic product so that it is obviously correct; it costs
O(T^2) memory and is only for tests and tiny shapes.
"""

from __future__ import annotations

import torch


def decay_mask(slopes_H: torch.Tensor, T: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D[h, t, j] = exp(-s_h (t - j)) for j <= t, else 0. Shape [H, T, T].

    The exponent is formed before masking with -inf so that large (t - j) * s never
    produces exp(+big) for the upper triangle.
    """
    idx = torch.arange(T, device=slopes_H.device, dtype=dtype)
    dist_TT = idx[:, None] - idx[None, :]
    expo_HTT = -slopes_H.to(dtype)[:, None, None] * dist_TT
    expo_HTT = expo_HTT.masked_fill(dist_TT < 0, float("-inf"))
    return torch.exp(expo_HTT)


def lightning_attention_naive(
    q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTE: torch.Tensor, slopes_H: torch.Tensor
) -> torch.Tensor:
    """Causal decayed linear attention, quadratic form, in float32 (float64 if given)."""
    dtype = torch.promote_types(q_BHTD.dtype, torch.float32)
    q, k, v = (x.to(dtype) for x in (q_BHTD, k_BHTD, v_BHTE))
    D_HTT = decay_mask(slopes_H, q.shape[2], dtype)
    scores_BHTT = torch.einsum("bhtd,bhjd->bhtj", q, k) * D_HTT
    out = torch.einsum("bhtj,bhje->bhte", scores_BHTT, v)
    return out.to(q_BHTD.dtype)


def lightning_attention_recurrent(
    q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTE: torch.Tensor, slopes_H: torch.Tensor
) -> torch.Tensor:
    """The same operator as a token-by-token recurrence S_t = lambda S_{t-1} + k_t^T v_t.

    A second, independent reference: the tests check the quadratic form against it.
    """
    dtype = torch.promote_types(q_BHTD.dtype, torch.float32)
    B, H, T, D = q_BHTD.shape
    E = v_BHTE.shape[-1]
    lam_H11 = torch.exp(-slopes_H.to(dtype))[:, None, None]
    S_BHDE = q_BHTD.new_zeros(B, H, D, E, dtype=dtype)
    outs = []
    for q_t, k_t, v_t in zip(
        q_BHTD.to(dtype).unbind(2), k_BHTD.to(dtype).unbind(2), v_BHTE.to(dtype).unbind(2)
    ):
        S_BHDE = lam_H11 * S_BHDE + k_t[..., :, None] * v_t[..., None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", q_t, S_BHDE))
    return torch.stack(outs, dim=2).to(q_BHTD.dtype)
