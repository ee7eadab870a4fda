"""Reference causal attention within documents: one dense [B, 1, T, T] boolean mask (causal
and same document) handed to SDPA. Obviously correct, O(T^2) memory, and on CPU the math
path (the mask disables the flash kernel): the reference for tests, and what letter A ran
before the per-document path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_mask(doc_ids_BT: torch.Tensor | None, T: int, device) -> torch.Tensor:
    """[B or 1, 1, T, T]: key j visible to query t (j <= t, same document)."""
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None]
    if doc_ids_BT is not None:
        mask = mask & (doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :])
    return mask[:, None]


def causal_attention_naive(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    mask = document_mask(doc_ids_BT, q_BHTD.shape[2], q_BHTD.device)
    return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTE, attn_mask=mask, scale=scale)
