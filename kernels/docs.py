"""Document boundaries for packed sequences.

A packed batch [B, T] holds several documents per row. Callers describe them the
flash-attention way, ``cu_seqlens``: a 1-D integer tensor of document start offsets into the
flattened B*T tokens, beginning with 0 and ending with B*T; every row start b*T must be one of
them (a document never spans two rows). The operators use the equivalent per-token document
index ``doc_ids`` [B, T] (non-decreasing along each row), from which "same document" masks
are one comparison.
"""

from __future__ import annotations

import torch


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """[B, T] int64 document index of every token (global across rows)."""
    cu = cu_seqlens.to(torch.int64).flatten()
    if cu.numel() < 2 or cu[0].item() != 0 or cu[-1].item() != B * T:
        raise ValueError(
            f"cu_seqlens: must start at 0 and end at B*T={B * T}; got {cu.tolist()[:8]}..."
        )
    if (cu[1:] <= cu[:-1]).any():
        raise ValueError("cu_seqlens: offsets must be strictly increasing (no empty documents)")
    rows = torch.arange(B, device=cu.device) * T
    if not torch.isin(rows, cu).all():
        raise ValueError(
            f"cu_seqlens: every row start (multiples of T={T}) must be a document start; "
            "documents may not span two rows"
        )
    starts = torch.zeros(B * T, dtype=torch.int64, device=cu.device)
    starts[cu[:-1]] = 1
    return (starts.cumsum(0) - 1).view(B, T)


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Inverse of ``doc_ids_from_cu_seqlens`` (row starts always count as starts)."""
    B, T = doc_ids.shape
    flat = doc_ids.flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    change[torch.arange(B, device=flat.device) * T] = True
    idx = torch.nonzero(change).flatten()
    return torch.cat([idx, torch.tensor([B * T], device=flat.device)])


def document_lengths(doc_ids: torch.Tensor) -> list[list[int]]:
    """The documents of each row as run lengths, in order: [B, T] doc ids -> B lists that sum
    to T (a run of equal ids is one document; row starts always start one). One host copy of
    the change points, so per-document loops can cut tensors with ``split``."""
    B, T = doc_ids.shape
    change = torch.nonzero(doc_ids[:, 1:] != doc_ids[:, :-1]).tolist()  # (row, t): t+1 starts
    starts: list[list[int]] = [[0] for _ in range(B)]
    for b, t in change:
        starts[b].append(t + 1)
    return [[e - s for s, e in zip(row, row[1:] + [T])] for row in starts]


def resolve_doc_ids(
    cu_seqlens: torch.Tensor | None, doc_ids: torch.Tensor | None, B: int, T: int
) -> torch.Tensor | None:
    """Accept either description (or none: one document per row)."""
    if cu_seqlens is not None and doc_ids is not None:
        raise ValueError("give cu_seqlens or doc_ids, not both")
    if cu_seqlens is not None:
        return doc_ids_from_cu_seqlens(cu_seqlens, B, T)
    if doc_ids is not None and tuple(doc_ids.shape) != (B, T):
        raise ValueError(f"doc_ids: shape {tuple(doc_ids.shape)}, expected ({B}, {T})")
    return doc_ids
