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
def _pair_scales(f: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The second-order features' factors, in (i, j), i <= j, row-major order: 1/sqrt(2f) on
    the diagonal, 1/sqrt(f) off it (the duplicate pair's share)."""
    i, j = torch.triu_indices(f, f)
    c = torch.full(i.shape, f**-0.5, dtype=torch.float64)
    c[i == j] = (2 * f) ** -0.5
    return c.to(dtype=dtype, device=device)


class _FeatureMap(torch.autograd.Function):
    """phi(x) = [1, x / f^(1/4), c_ij x_i x_j (i <= j)] with an explicit backward.

    The second-order block is written row by row: for each i, x_i times x[i:] (f slices that
    together write each of the f(f+1)/2 features once), then one pass for the factors. The
    backward is the same slices transposed: dx_i gets sum_j h_ij x_j (row i) and
    h_ji x_i lands on x[i:] (column i), with h = g * c. Both directions touch each feature a
    couple of times; the previous form (two [f+1, F] selection matmuls and their product
    under autograd) wrote and read several F-wide temporaries through matmuls with an inner
    dimension of 17, and took 242 ms forward + backward for one feature map of based-25m at
    8K tokens (16 heads)."""

    @staticmethod
    def forward(ctx, x):
        f = x.shape[-1]
        out = x.new_empty(*x.shape[:-1], 1 + f + f * (f + 1) // 2)
        out[..., 0] = 1
        torch.mul(x, f**-0.25, out=out[..., 1 : f + 1])
        off = f + 1
        for i in range(f):
            torch.mul(x[..., i : i + 1], x[..., i:], out=out[..., off : off + f - i])
            off += f - i
        out[..., f + 1 :].mul_(_pair_scales(f, x.dtype, x.device))
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        f = x.shape[-1]
        h = g[..., f + 1 :] * _pair_scales(f, x.dtype, x.device)
        dx = g[..., 1 : f + 1] * f**-0.25
        off = 0
        for i in range(f):
            h_i = h[..., off : off + f - i]  # d/d(x_i x_j), j >= i
            dx[..., i] += (h_i * x[..., i:]).sum(-1)
            dx[..., i:].addcmul_(h_i, x[..., i : i + 1])
            off += f - i
        return dx


def feature_map(x_BHTF: torch.Tensor) -> torch.Tensor:
    """[..., f] -> [..., 1 + f + f(f+1)/2], computed in float32 (float64 if given):
    phi = [1, x / f^(1/4), (x_i x_j c_ij)_{i <= j}] (module docstring; ``_FeatureMap``)."""
    x = x_BHTF.to(torch.promote_types(x_BHTF.dtype, torch.float32))
    return _FeatureMap.apply(x)


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
    )
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
