"""Reference Based linear attention: the quadratic form of the 2nd-order Taylor kernel.

    w_tj = 1 + s + s^2 / 2,  s = q_t . k_j / sqrt(f)      (j <= t, same document)
    y_t  = sum_j w_tj v_j / (sum_j w_tj + eps)

This is what phi(q) . phi(k) equals exactly (``feature_map``), so the linear-time paths are
checked against the kernel they approximate exp with, not against themselves.
"""

from __future__ import annotations

import torch


def based_attention_naive(
    q_BHTF: torch.Tensor,
    k_BHTF: torch.Tensor,
    v_BHTE: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    dtype = torch.promote_types(q_BHTF.dtype, torch.float32)
    q, k, v = (x.to(dtype) for x in (q_BHTF, k_BHTF, v_BHTE))
    T, f = q.shape[2], q.shape[3]
    s = torch.einsum("bhtf,bhjf->bhtj", q, k) / f**0.5
    w = 1 + s + 0.5 * s * s
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()[None, None]
    if doc_ids_BT is not None:
        mask = mask & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])[:, None]
    w = w * mask.to(dtype)
    y = torch.einsum("bhtj,bhje->bhte", w, v) / (w.sum(-1, keepdim=True) + eps)
    return y.to(q_BHTF.dtype)
