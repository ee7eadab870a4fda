"""Lightning attention: causal linear attention with per-head exponential decay.

``lightning_attention`` is the one entry point the models call; ``backend="auto"`` takes the
Triton kernel for CUDA tensors and the chunked PyTorch path otherwise. ``lightning_attention_step``
is the recurrent form for generation: it continues from the final state of a prefill.

Every entry point takes an optional per-token log-decay ``g`` [B, H, T] (g_t <= 0) beside the
constant slopes: token t's decay is then exp(g_t - s_h). That is Mamba-2's state-space dual
(g = dt A); a call without ``g`` runs exactly the constant-slope code it always ran.
"""

from __future__ import annotations

import torch

from plait.kernels.docs import resolve_doc_ids

from .chunk import chunk_state_weights, lightning_attention_chunk
from .naive import lightning_attention_naive, lightning_attention_recurrent

__all__ = [
    "lightning_attention",
    "lightning_chunk_state",
    "lightning_attention_chunk",
    "lightning_attention_naive",
    "lightning_attention_recurrent",
    "lightning_attention_step",
]

BACKENDS = ("auto", "naive", "chunk", "triton")


def _check_g(g, like, what="lightning_attention"):
    B, H, T = like.shape[:3]
    if g is not None and g.shape != (B, H, T):
        raise ValueError(f"{what}: g shape {tuple(g.shape)}, expected {(B, H, T)}")


def _check(q, k, v, slopes, initial_state):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"lightning_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "expected q, k [B,H,T,D] and v [B,H,T,E]"
        )
    if slopes.shape != (q.shape[1],):
        raise ValueError(
            f"lightning_attention: slopes shape {tuple(slopes.shape)}, expected ({q.shape[1]},)"
        )
    if bool((slopes < 0).any()):
        raise ValueError(
            f"lightning_attention: slopes must be >= 0 (decay exp(-s) <= 1), got min "
            f"{slopes.min().item():.3g}"
        )
    B, H, _, D = q.shape
    if initial_state is not None and initial_state.shape != (B, H, D, v.shape[-1]):
        raise ValueError(
            f"lightning_attention: initial_state shape {tuple(initial_state.shape)}, "
            f"expected {(B, H, D, v.shape[-1])}"
        )


def lightning_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    block: int = 64,
    backend: str = "auto",
    g: torch.Tensor | None = None,
):
    """o_t = sum_{j<=t, same document} exp(-s_h (t-j)) (q_t . k_j) v_j  (+ the decayed
    ``initial_state`` [B,H,D,E], which the first document of each row continues).

    q, k [B,H,T,D], v [B,H,T,E]; ``slopes_H`` holds s_h >= 0 (0 = no decay). With ``g``
    [B,H,T] (per-token log-decays, <= 0), exp(-s_h (t-j)) becomes exp(sum_{j<i<=t}(g_i - s_h)).
    Document boundaries come as ``cu_seqlens`` or ``doc_ids`` (see kernels/docs.py). Returns
    o, or (o, final state in float32) with ``return_state``.
    """
    _check(q_BHTD, k_BHTD, v_BHTE, slopes_H, initial_state)
    _check_g(g, q_BHTD)
    B, _, T, _ = q_BHTD.shape
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if docs is not None and T > 1 and bool((docs[:, 1:] < docs[:, :-1]).any()):
        raise ValueError("lightning_attention: doc_ids must be non-decreasing along each row")
    if backend not in BACKENDS:
        raise ValueError(f"lightning_attention: backend {backend!r} not in {BACKENDS}")
    if backend == "auto":
        backend = "triton" if q_BHTD.is_cuda else "chunk"
    args = (q_BHTD, k_BHTD, v_BHTE, slopes_H, docs, initial_state, return_state)
    if backend == "naive":
        return lightning_attention_naive(*args, g_BHT=g)
    if backend == "triton":
        from .triton import lightning_attention_triton

        return lightning_attention_triton(*args, block=max(16, block), g_BHT=g)
    return lightning_attention_chunk(*args, block=block, g_BHT=g)


def lightning_attention_step(
    q_BHD: torch.Tensor,
    k_BHD: torch.Tensor,
    v_BHE: torch.Tensor,
    slopes_H: torch.Tensor,
    state_BHDE: torch.Tensor | None = None,
    g_BH: torch.Tensor | None = None,
):
    """One token of the recurrence: S <- lambda S + k^T v, o = q S. Returns (o, S).

    lambda = exp(-s_h), or exp(g - s_h) with this token's log-decays ``g_BH`` [B, H].
    The state stays float32 (the prefill returns it in float32 too).
    """
    B, H, D = q_BHD.shape
    E = v_BHE.shape[-1]
    acc = torch.promote_types(q_BHD.dtype, torch.float32)
    S = state_BHDE.to(acc) if state_BHDE is not None else q_BHD.new_zeros(B, H, D, E, dtype=acc)
    lam = torch.exp(-slopes_H.to(acc))[None, :, None, None]
    if g_BH is not None:
        lam = torch.exp(g_BH.to(acc) - slopes_H.to(acc)[None])[..., None, None]
    S = lam * S + k_BHD.to(acc)[..., :, None] * v_BHE.to(acc)[..., None, :]
    o = torch.einsum("bhd,bhde->bhe", q_BHD.to(acc), S)
    return o.to(q_BHD.dtype), S


def lightning_chunk_state(
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
) -> torch.Tensor:
    """The state a chunk hands on, from a zero start: sum_j lambda^(T-1-j) k_j^T v_j over the
    chunk's last document, in float32 (one matmul, no intra-chunk work). Sequence
    parallelism (LASP-2) gathers these across ranks. With per-token log-decays ``g`` the
    weight of k_j is exp(sum_{j<i<T}(g_i - s_h)) instead."""
    _check_g(g, k_BHTD, "lightning_chunk_state")
    acc = torch.promote_types(k_BHTD.dtype, torch.float32)
    kd = chunk_state_weights(slopes_H.to(k_BHTD.device), k_BHTD.shape[2], doc_ids, g, acc)
    return (k_BHTD.to(acc) * kd[..., None]).transpose(-1, -2) @ v_BHTE.to(acc)
