"""Reference sliding-window causal softmax attention: query t sees keys t - w < j <= t of its
own document. One masked T x T softmax: obviously correct, O(T^2) memory, for tests only."""

from __future__ import annotations

import torch


def window_mask(T: int, window: int, doc_ids_BT: torch.Tensor | None, device) -> torch.Tensor:
    t = torch.arange(T, device=device)
    dist = t[:, None] - t[None, :]
    mask = ((dist >= 0) & (dist < window))[None, None]
    if doc_ids_BT is not None:
        mask = mask & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])[:, None]
    return mask


def swa_naive(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    window: int,
    doc_ids_BT: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    dtype = torch.promote_types(q_BHTD.dtype, torch.float32)
    q, k, v = (x.to(dtype) for x in (q_BHTD, k_BHTD, v_BHTE))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhtd,bhjd->bhtj", q, k) * scale
    s = s.masked_fill(~window_mask(q.shape[2], window, doc_ids_BT, q.device), float("-inf"))
    return torch.einsum("bhtj,bhje->bhte", s.softmax(-1), v).to(q_BHTD.dtype)
