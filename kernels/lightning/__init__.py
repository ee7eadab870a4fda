"""Lightning attention: causal linear attention with per-head exponential decay.

``lightning_attention`` is the one entry point the models call. Today it runs the chunked
PyTorch path on every device; the Triton kernel (forward and backward) and document
boundaries arrive with the kernels issue and plug in here without changing callers.
"""

from __future__ import annotations

import torch

from .chunk import lightning_attention_chunk
from .naive import lightning_attention_naive, lightning_attention_recurrent

__all__ = [
    "lightning_attention",
    "lightning_attention_chunk",
    "lightning_attention_naive",
    "lightning_attention_recurrent",
]


def lightning_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    block: int = 64,
) -> torch.Tensor:
    """o_t = sum_{j<=t} exp(-s_h (t-j)) (q_t . k_j) v_j for q, k [B,H,T,D], v [B,H,T,E].

    ``slopes_H`` holds s_h >= 0 per head (0 = no decay).
    """
    if q_BHTD.dim() != 4 or k_BHTD.shape != q_BHTD.shape or v_BHTE.shape[:3] != q_BHTD.shape[:3]:
        raise ValueError(
            f"lightning_attention: q {tuple(q_BHTD.shape)}, k {tuple(k_BHTD.shape)}, "
            f"v {tuple(v_BHTE.shape)}; expected q, k [B,H,T,D] and v [B,H,T,E]"
        )
    if slopes_H.shape != (q_BHTD.shape[1],):
        raise ValueError(
            f"lightning_attention: slopes shape {tuple(slopes_H.shape)}, "
            f"expected ({q_BHTD.shape[1]},)"
        )
    return lightning_attention_chunk(q_BHTD, k_BHTD, v_BHTE, slopes_H, block=block)
