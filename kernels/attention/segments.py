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


def per_document(fn, q_BHTD, k_BHTD, v_BHTE, doc_ids_BT: torch.Tensor) -> torch.Tensor:
    """``fn(q, k, v)`` on each document's piece of the T axis (dim 2) of [B, H, T, *]
    tensors, joined back: rows that share their boundaries are cut together, other rows one
    by one. Also the CPU sliding-window path's cut (kernels/swa/flash_cpu.py)."""
    rows = document_lengths(doc_ids_BT)

    def cut(q, k, v, lengths):
        if len(lengths) == 1:
            return fn(q, k, v)
        pieces = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
        return torch.cat([fn(a, b, c) for a, b, c in pieces], 2)

    if all(r == rows[0] for r in rows):
        return cut(q_BHTD, k_BHTD, v_BHTE, rows[0])
    outs = [
        cut(q[None], k[None], v[None], lengths)[0]
        for q, k, v, lengths in zip(q_BHTD.unbind(0), k_BHTD.unbind(0), v_BHTE.unbind(0), rows)
    ]
    return torch.stack(outs)


def causal_attention_segments(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    doc_ids_BT: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    return per_document(causal, q_BHTD, k_BHTD, v_BHTE, doc_ids_BT)
