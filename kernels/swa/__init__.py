"""Sliding-window causal softmax attention (Based's and SeqBoat's local attention).

Query t attends to keys t - window < j <= t of its own document. ``swa`` is the one entry
point: the Triton kernel for CUDA tensors, the blocked PyTorch path otherwise; both cost
O(T * window). Generation needs no special form: keep the last ``window`` keys and values.
"""

from __future__ import annotations

import torch

from plait.kernels.docs import resolve_doc_ids

from .chunk import swa_chunk
from .naive import swa_naive

__all__ = ["swa", "swa_chunk", "swa_naive"]


def swa(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    window: int,
    *,
    cu_seqlens: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
    block: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    if window < 1:
        raise ValueError(f"swa: window must be >= 1, got {window}")
    if k_BHTD.shape != q_BHTD.shape or v_BHTE.shape[:3] != q_BHTD.shape[:3]:
        raise ValueError(
            f"swa: q {tuple(q_BHTD.shape)}, k {tuple(k_BHTD.shape)}, v {tuple(v_BHTE.shape)}; "
            "expected q, k [B,H,T,D] and v [B,H,T,E]"
        )
    B, _, T, _ = q_BHTD.shape
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if backend == "auto":
        backend = "triton" if q_BHTD.is_cuda else "chunk"
    if backend == "naive":
        return swa_naive(q_BHTD, k_BHTD, v_BHTE, window, docs, scale)
    if backend == "chunk":
        return swa_chunk(q_BHTD, k_BHTD, v_BHTE, window, docs, scale)
    if backend == "triton":
        from .triton import swa_triton

        return swa_triton(q_BHTD, k_BHTD, v_BHTE, window, docs, scale, block=max(16, block))
    raise ValueError(f"swa: backend {backend!r} not in ('auto', 'naive', 'chunk', 'triton')")
