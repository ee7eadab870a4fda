"""Based linear attention (Arora et al., 2024): the 2nd-order Taylor feature map with a
normalised output.

    phi(x) = [1, x / f^(1/4), (x_i x_j)_{i<=j} * c_ij / sqrt(f)],  c_ii = 1/sqrt(2), c_ij = 1
    y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),  S_t = sum_j phi(k_j)^T v_j,  z_t = sum_j phi(k_j)

The symmetric duplicates of x x^T are removed (1 + f + f(f+1)/2 = 153 dims for f = 16, not
the 273 of the original code); the off-diagonal products carry the factor sqrt(2) that the
duplicate pair would have contributed, so phi(q) . phi(k) = 1 + s + s^2/2 exactly.

Numerator and denominator are one causal linear attention over the values augmented with a
column of ones, so the fast paths are lightning attention's (decay 0): the chunked PyTorch
path on CPU and the Triton kernel on CUDA; the feature map itself is elementwise PyTorch.
Document boundaries and the recurrent step work as in lightning attention.
"""

from __future__ import annotations

import functools

import torch

from plait.kernels.docs import resolve_doc_ids
from plait.kernels.lightning import lightning_attention, lightning_attention_step

from .naive import based_attention_naive

__all__ = ["based_attention", "based_attention_naive", "based_attention_step", "feature_map"]


@functools.lru_cache(maxsize=16)
def _selections(f: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """[f + 1, 1 + f + f(f+1)/2] matrices A (with the scales) and B that pick, for each
    feature, the two factors of [1, x] it multiplies: (0, 0) the constant, (0, j) x_j,
    (i, j) with i <= j the second-order products."""
    i, j = torch.triu_indices(f, f)
    first = [0] * (f + 1) + (i + 1).tolist()
    second = list(range(f + 1)) + (j + 1).tolist()
    scale = [1.0] + [f**-0.25] * f + [(0.5**0.5 if a == b else 1.0) / f**0.5
                                      for a, b in zip(i.tolist(), j.tolist())]  # fmt: skip
    n = len(first)
    A = torch.zeros(f + 1, n, dtype=dtype)
    B = torch.zeros(f + 1, n, dtype=dtype)
    A[first, range(n)] = torch.tensor(scale, dtype=dtype)
    B[second, range(n)] = 1.0
    return A.to(device), B.to(device)


def feature_map(x_BHTF: torch.Tensor) -> torch.Tensor:
    """[..., f] -> [..., 1 + f + f(f+1)/2], computed in float32 (float64 if given).

    Each feature is a product of two entries of [1, x], picked by two constant selection
    matrices: phi = ([1, x] A) * ([1, x] B). Two small matmuls instead of gathering x[..., i]
    and x[..., j]: the gathers' backward is an accumulating index_put that runs on one thread
    on CPU (the feature map of based-25m at 8K took ~1.3x longer that way, single-threaded
    CPU time, and more with threads); both give the same values to rounding."""
    f = x_BHTF.shape[-1]
    x = x_BHTF.to(torch.promote_types(x_BHTF.dtype, torch.float32))
    A, B = _selections(f, x.dtype, x.device)
    xa = torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)
    return (xa @ A) * (xa @ B)


def based_attention(
    q_BHTF: torch.Tensor,
    k_BHTF: torch.Tensor,
    v_BHTE: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    eps: float = 1e-6,
    block: int = 64,
    backend: str = "auto",
):
    """Causal Based linear attention. q, k [B,H,T,f], v [B,H,T,E] -> y [B,H,T,E].

    The state is lightning attention's over the augmented values: [B, H, F, E + 1] with
    F = 1 + f + f(f+1)/2 (the last column is z). ``backend="naive"`` runs the quadratic form.
    """
    B, H, T, _ = q_BHTF.shape
    E = v_BHTE.shape[-1]
    if k_BHTF.shape != q_BHTF.shape or v_BHTE.shape[:3] != q_BHTF.shape[:3]:
        raise ValueError(
            f"based_attention: q {tuple(q_BHTF.shape)}, k {tuple(k_BHTF.shape)}, "
            f"v {tuple(v_BHTE.shape)}; expected q, k [B,H,T,f] and v [B,H,T,E]"
        )
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if backend == "naive":
        if initial_state is not None or return_state:
            raise ValueError("based_attention: the naive backend has no state; use chunk")
        return based_attention_naive(q_BHTF, k_BHTF, v_BHTE, docs, eps)
    acc = torch.promote_types(v_BHTE.dtype, torch.float32)
    v_aug = torch.cat([v_BHTE.to(acc), torch.ones_like(v_BHTE[..., :1], dtype=acc)], dim=-1)
    zeros = torch.zeros(H, device=q_BHTF.device)
    out, state = lightning_attention(
        feature_map(q_BHTF), feature_map(k_BHTF), v_aug, zeros, doc_ids=docs,
        initial_state=initial_state, return_state=True, block=block, backend=backend,
    )  # fmt: skip
    y = (out[..., :E] / (out[..., E:] + eps)).to(v_BHTE.dtype)
    return (y, state) if return_state else y


def based_attention_step(
    q_BHF: torch.Tensor,
    k_BHF: torch.Tensor,
    v_BHE: torch.Tensor,
    state: torch.Tensor | None = None,
    eps: float = 1e-6,
):
    """One token: the state [B, H, F, E+1] absorbs phi(k)^T [v, 1]; returns (y, state)."""
    H, E = q_BHF.shape[1], v_BHE.shape[-1]
    acc = torch.promote_types(v_BHE.dtype, torch.float32)
    v_aug = torch.cat([v_BHE.to(acc), torch.ones_like(v_BHE[..., :1], dtype=acc)], dim=-1)
    zeros = torch.zeros(H, device=q_BHF.device)
    out, state = lightning_attention_step(
        feature_map(q_BHF), feature_map(k_BHF), v_aug, zeros, state
    )
    return (out[..., :E] / (out[..., E:] + eps)).to(v_BHE.dtype), state
