"""The gated delta rule: linear attention whose state is written by the delta rule and
forgotten by a per-token, per-head decay (Gated DeltaNet; Qwen3-Next and Qwen3.5's linear
layers).

``gated_delta_rule`` is the one entry point the models call. Paths: ``naive`` (the token
recurrence, the reference), ``chunk`` (the WY / UT form in PyTorch, the CPU path) and
``triton`` (the same form with its sequential chunk scan as one Triton kernel each way, the
GPU path; ``auto`` takes it for CUDA tensors). ``gated_delta_step`` is the recurrent form for
generation, continuing from a prefill's final state.
"""

from __future__ import annotations

import torch

from plait.kernels.docs import resolve_doc_ids

from .chunk import gated_delta_chunk
from .naive import gated_delta_recurrent, gated_delta_step_fn

__all__ = [
    "gated_delta_rule",
    "gated_delta_chunk",
    "gated_delta_recurrent",
    "gated_delta_step",
    "l2_normalize",
]

BACKENDS = ("auto", "naive", "chunk", "triton")


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x * rsqrt(sum(x^2) + eps) over the last dim, in at least float32: the release's
    ``l2norm`` (eps inside the root, as flash-linear-attention computes it), which Qwen3.5
    applies to q and k before the rule."""
    xf = x if x.dtype == torch.float64 else x.float()
    return xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)


def _check(q, k, v, g, beta, initial_state):
    B, H, T, K = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"gated_delta_rule: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
            "expected q, k [B,H,T,K] and v [B,H,T,V] (repeat grouped heads before the call)"
        )
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, H, T):
            raise ValueError(f"gated_delta_rule: {name} {tuple(x.shape)}, expected {(B, H, T)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(
            f"gated_delta_rule: initial_state {tuple(initial_state.shape)}, expected "
            f"{(B, H, K, v.shape[-1])}"
        )


def gated_delta_rule(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTV: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    scale: float | None = None,
    block: int = 64,
    backend: str = "auto",
):
    """S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T (scale q_t),
    with S restarting at each document (``cu_seqlens`` or ``doc_ids``, kernels/docs.py) and
    ``initial_state`` [B,H,K,V] continued by each row's first document.

    q, k [B,H,T,K] (normalised by the caller, as the release does), v [B,H,T,V], g [B,H,T]
    log-decays (<= 0), beta [B,H,T] in [0, 1]; ``scale`` defaults to K^-0.5. Returns o, or
    (o, final state in float32) with ``return_state``.
    """
    _check(q_BHTK, k_BHTK, v_BHTV, g_BHT, beta_BHT, initial_state)
    B, _, T, _ = q_BHTK.shape
    docs = resolve_doc_ids(cu_seqlens, doc_ids, B, T)
    if docs is not None and T > 1 and bool((docs[:, 1:] < docs[:, :-1]).any()):
        raise ValueError("gated_delta_rule: doc_ids must be non-decreasing along each row")
    if backend not in BACKENDS:
        raise ValueError(f"gated_delta_rule: backend {backend!r} not in {BACKENDS}")
    args = (q_BHTK, k_BHTK, v_BHTV, g_BHT, beta_BHT, docs, initial_state, return_state, scale)
    if backend == "auto":
        backend = "triton" if q_BHTK.is_cuda else "chunk"
    if backend == "naive":
        return gated_delta_recurrent(*args)
    return gated_delta_chunk(*args, block=block, scan="loop" if backend == "chunk" else "triton")


def gated_delta_step(
    q_BHK: torch.Tensor,
    k_BHK: torch.Tensor,
    v_BHV: torch.Tensor,
    g_BH: torch.Tensor,
    beta_BH: torch.Tensor,
    state_BHKV: torch.Tensor | None = None,
    scale: float | None = None,
):
    """One token of the recurrence (decoding). Returns (o, state); the state stays float32."""
    B, H, K = q_BHK.shape
    acc = torch.promote_types(q_BHK.dtype, torch.float32)
    scale = K**-0.5 if scale is None else scale
    S = (
        state_BHKV.to(acc)
        if state_BHKV is not None
        else q_BHK.new_zeros(B, H, K, v_BHV.shape[-1], dtype=acc)
    )
    S, o = gated_delta_step_fn(
        q_BHK.to(acc) * scale, k_BHK.to(acc), v_BHV.to(acc), g_BH.to(acc), beta_BH.to(acc), S
    )
    return o.to(q_BHK.dtype), S
