"""Causal softmax attention within packed documents (letter A's single-rank operator).

Query t of a row sees keys j <= t of its own document. ``causal_attention`` is the one entry
point; it picks the path:

* no documents: one SDPA call with ``is_causal`` (PyTorch's flash kernels, CPU and CUDA);
* ``segments`` (CPU, and CUDA in float32): the row cut at its document boundaries and one
  causal SDPA call per document. Documents are contiguous runs, so "causal within the
  document" is plain causal attention on each run: no [T, T] mask, the flash kernel on every
  piece, and sum_d L_d^2 / 2 score entries instead of T^2 / 2. torch's CPU SDPA with an
  explicit [T, T] mask falls back to the math path (scores materialised, no causal skip):
  ~5x slower than this at 8K with 1K-token documents, and O(T^2) memory;
* ``varlen`` (CUDA, fp16/bf16): flash attention's variable-length form
  (``torch.nn.attention.varlen.varlen_attn``) over the packed rows, documents given as
  cu_seqlens: one kernel launch, no host loop. Not yet run on a GPU (no GPU in CI);
* ``naive``: the dense [T, T] boolean mask, the reference the others are tested against.

The names differ from the other kernels' naive / chunk / triton: nothing is chunked here
(the cut is at document boundaries), and the GPU path is torch's flash kernel, not Triton.
FlexAttention with a block mask was measured as the alternative: torch 2.13 has no CPU
backward for it.

``prefix_causal_attention`` (prefix.py) is the other shape context parallelism needs: queries
that see a whole prefix of earlier keys plus their own keys causally (LASP-2H's piece for a
document begun on an earlier rank), without a mask on CPU or CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from plait.kernels.docs import resolve_doc_ids

from .naive import causal_attention_naive
from .prefix import prefix_causal_attention
from .segments import causal_attention_segments
from .varlen import causal_attention_varlen

__all__ = [
    "causal_attention",
    "causal_attention_naive",
    "causal_attention_segments",
    "causal_attention_varlen",
    "prefix_causal_attention",
]

BACKENDS = ("auto", "naive", "segments", "varlen")


def causal_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention within documents: q, k [B, H, T, D], v [B, H, T, E] ->
    [B, H, T, E]. Documents as ``doc_ids`` [B, T] or ``cu_seqlens`` (kernels/docs.py); none:
    one document per row. ``scale`` defaults to D^-1/2."""
    if backend not in BACKENDS:
        raise ValueError(f"causal_attention: backend {backend!r} not in {BACKENDS}")
    if q_BHTD.dim() != 4 or k_BHTD.shape != q_BHTD.shape or v_BHTE.shape[:3] != q_BHTD.shape[:3]:
        raise ValueError(
            f"causal_attention: q {tuple(q_BHTD.shape)}, k {tuple(k_BHTD.shape)}, "
            f"v {tuple(v_BHTE.shape)}; expected q, k [B,H,T,D] and v [B,H,T,E]"
        )
    B, _, T, _ = q_BHTD.shape
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if backend == "naive":
        return causal_attention_naive(q_BHTD, k_BHTD, v_BHTE, docs, scale)
    if docs is None:
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTE, is_causal=True, scale=scale)
    if backend == "auto":
        half = q_BHTD.dtype in (torch.float16, torch.bfloat16)
        backend = "varlen" if q_BHTD.is_cuda and half else "segments"
    if backend == "varlen":
        return causal_attention_varlen(q_BHTD, k_BHTD, v_BHTE, docs, scale)
    return causal_attention_segments(q_BHTD, k_BHTD, v_BHTE, docs, scale)
