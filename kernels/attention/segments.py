"""Causal attention within documents by cutting each row at its document boundaries: one
causal SDPA call per document, no mask (the fast path on CPU).

Rows that share their boundaries (always at batch size 1) are cut together, one call per
document for the whole batch; otherwise each row is cut on its own. The cuts are ``unbind``
and ``split`` and the pieces are joined with ``cat``, whose backwards are one stack / cat of
the gradients: slicing the tensors in the loop instead would make every piece's backward
allocate a zero gradient of the whole tensor (quadratic in the number of documents).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.kernels.docs import document_lengths


def _cut(q, k, v, lengths: list[int], scale):
    """One causal call per document of the T axis (dim 2) of [B, H, T, *] tensors that share
    the document ``lengths``."""
    if len(lengths) == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pieces = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
    outs = [
        F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale) for a, b, c in pieces
    ]
    return torch.cat(outs, 2)


def causal_attention_segments(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    doc_ids_BT: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    rows = document_lengths(doc_ids_BT)
    if all(r == rows[0] for r in rows):
        return _cut(q_BHTD, k_BHTD, v_BHTE, rows[0], scale)
    outs = [
        _cut(q[None], k[None], v[None], lengths, scale)[0]
        for q, k, v, lengths in zip(q_BHTD.unbind(0), k_BHTD.unbind(0), v_BHTE.unbind(0), rows)
    ]
    return torch.stack(outs)
