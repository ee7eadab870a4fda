"""Sliding-window causal softmax attention (Based's and SeqBoat's local attention).

Query t attends to keys t - window < j <= t of its own document. ``swa`` is the one entry
point: the Triton kernel for CUDA tensors; on CPU two causal calls of torch's CPU flash
operator per block of window - 1 tokens (flash_cpu.py; values as wide as keys, window >= 2,
2.6x faster than the blocked path at based-25m's W layer), else the blocked PyTorch path
(chunk.py); all cost O(T * window). Generation needs no special form: keep the last
``window`` keys and values.
"""

from __future__ import annotations

import torch

from plait.kernels.docs import resolve_doc_ids

from .chunk import swa_chunk
from .flash_cpu import swa_flash_cpu
from .naive import swa_naive

__all__ = ["swa", "swa_chunk", "swa_flash_cpu", "swa_naive"]


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
        flash_ok = (
            window >= 2
            and v_BHTE.shape[-1] == q_BHTD.shape[-1]
            and q_BHTD.dtype in (torch.float32, torch.float64, torch.bfloat16)
        )
        backend = "triton" if q_BHTD.is_cuda else "flash_cpu" if flash_ok else "chunk"
    if backend == "naive":
        return swa_naive(q_BHTD, k_BHTD, v_BHTE, window, docs, scale)
    if backend == "chunk":
        return swa_chunk(q_BHTD, k_BHTD, v_BHTE, window, docs, scale)
    if backend == "flash_cpu":
        return swa_flash_cpu(q_BHTD, k_BHTD, v_BHTE, window, docs, scale)
    if backend == "triton":
        from .triton import swa_triton

        return swa_triton(q_BHTD, k_BHTD, v_BHTE, window, docs, scale, block=max(16, block))
    raise ValueError(
        f"swa: backend {backend!r} not in ('auto', 'naive', 'chunk', 'flash_cpu', 'triton')"
    )
