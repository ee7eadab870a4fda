"""LASP-2 sequence parallelism for lightning attention (linear attention with decay).

Rank r of the context-parallel group holds tokens [rC, (r+1)C) of every sequence. Each rank
computes the state its chunk hands on, M_r (d x e per head, fp32, from zero: its size does not
depend on the sequence length), and one all-gather gives every rank all of them. Rank r then
needs P_r, the state entering its chunk:
    Q_s = M_s + [chunk s is one document continuing from s-1] lambda^C Q_{s-1},
    P_r = [rank r's first token continues rank r-1's last document] Q_{r-1},
and its output is its local causal attention (no communication) plus the inter-chunk term
(q_i * lambda^(i+1)) P_r on the tokens of its first document. The backward is autograd
through these pieces: the all-gather's backward returns to each rank the summed gradient of
its M_r (a reduce-scatter on NCCL), which is exactly LASP-2's all-gather of state gradients
followed by the suffix combination -- nothing is scaled by the group size.

Documents may start anywhere, including exactly at a rank border or inside a chunk; doc ids
must be global (consistent across ranks), as the loader produces them.
Bidirectional attention (``causal=False``, no decay, no documents) uses the total state.

Per-token decays (``g``, Mamba-2): lambda^C becomes rank s's own total decay exp(sum over its
tokens of g - s), and the first document's query factor exp(G_i) with G the rank's running sum.
Each rank appends its log total decay to its M_r, so it travels in the same all-gather (and
its gradient comes back through that gather's backward); without ``g`` nothing is appended.
The forward overlaps the state all-gather with the local attention (an async collective
attached to autograd afterwards); the backward's reduce-scatter is not overlapped yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plait.kernels.based import based_attention
from plait.kernels.lightning import lightning_attention, lightning_chunk_state

from .collectives import AsyncGather, all_gather, all_gather_nograd

if TYPE_CHECKING:
    from .sequence import SequenceParallel


def lightning(sp: SequenceParallel, q, k, v, slopes, doc_ids=None, block: int = 64, g=None):
    """Lightning attention in the context ``sp``: the plain kernel on one rank, LASP-2 over
    the context-parallel group otherwise (letters L and M; ``g`` = per-token log-decays)."""
    sp.require_contiguous("LASP-2")
    if sp.world == 1:
        return lightning_attention(q, k, v, slopes, doc_ids=doc_ids, block=block, g=g)
    return lightning_attention_lasp2(
        q, k, v, slopes, sp.group, doc_ids=doc_ids, block=block, g=g
    )


def based(sp: SequenceParallel, q, k, v, doc_ids=None, eps: float = 1e-6, block: int = 64):
    """Based linear attention in the context ``sp`` (LASP-2 over the Taylor-feature states;
    letter B)."""
    sp.require_contiguous("Based linear attention (LASP-2)")
    if sp.world == 1:
        return based_attention(q, k, v, doc_ids=doc_ids, eps=eps, block=block)
    return based_attention_lasp2(q, k, v, sp.group, doc_ids=doc_ids, eps=eps, block=block)


def chunk_state(
    k_BHCD, v_BHCE, slopes_H, doc_ids=None, backend: str = "auto", g=None
) -> torch.Tensor:
    """M_r, the state this rank's chunk hands on (float32), on the kernels' own pieces: the
    Triton state kernel for CUDA tensors (and ``backend="triton"``, which the tests run under
    the CPU interpreter), the one-matmul PyTorch form otherwise (unchanged on CPU). The kernel
    takes fp32/bf16/fp16; other dtypes (float64 in tests) stay on the PyTorch form."""
    use_triton = backend == "triton" or (backend == "auto" and k_BHCD.is_cuda)
    dt = torch.promote_types(k_BHCD.dtype, v_BHCE.dtype)  # Based's values carry a fp32 column
    if use_triton and dt in (torch.float32, torch.bfloat16, torch.float16):
        from plait.kernels.lightning.triton import lightning_chunk_state_triton

        return lightning_chunk_state_triton(
            k_BHCD.to(dt), v_BHCE.to(dt), slopes_H, doc_ids, g_BHT=g
        )
    return lightning_chunk_state(k_BHCD, v_BHCE, slopes_H, doc_ids, g=g)


def lightning_attention_lasp2(
    q_BHCD: torch.Tensor,
    k_BHCD: torch.Tensor,
    v_BHCE: torch.Tensor,
    slopes_H: torch.Tensor,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    causal: bool = True,
    block: int = 64,
    backend: str = "auto",
    g: torch.Tensor | None = None,
) -> torch.Tensor:
    W = dist.get_world_size(group) if group is not None else 1
    r = dist.get_rank(group) if group is not None else 0
    acc = torch.promote_types(q_BHCD.dtype, torch.float32)
    if not causal:
        if doc_ids is not None or g is not None or bool((slopes_H != 0).any()):
            raise ValueError("lightning LASP-2: bidirectional mode takes no decay and no documents")
        total = all_gather(chunk_state(k_BHCD, v_BHCE, slopes_H, backend=backend), group).sum(0)
        return (q_BHCD.to(acc) @ total).to(q_BHCD.dtype)

    if W == 1:
        return lightning_attention(
            q_BHCD, k_BHCD, v_BHCE, slopes_H, doc_ids=doc_ids, block=block, backend=backend, g=g
        )
    B, H, C, D = q_BHCD.shape
    E = v_BHCE.shape[-1]
    M_r = chunk_state(k_BHCD, v_BHCE, slopes_H, doc_ids, backend, g=g)
    if g is not None:  # the rank's running log-decay; its total travels with M_r
        G = (g.to(acc) - slopes_H.to(acc)[None, :, None]).cumsum(-1)  # [B, H, C]
        M_r = torch.cat([M_r.flatten(-2), G[..., -1:].to(M_r.dtype)], dim=-1)
    # The state all-gather runs while the local (intra-chunk) attention is computed.
    gather = AsyncGather(M_r, group)
    local = lightning_attention(
        q_BHCD, k_BHCD, v_BHCE, slopes_H, doc_ids=doc_ids, block=block, backend=backend, g=g
    )
    M_all = gather.result()
    if g is None:
        carry = torch.exp(-slopes_H.to(acc) * C)[None, :, None, None]  # [1, H, 1, 1]
        carries = [carry] * W
    else:
        carries = torch.exp(M_all[..., -1].to(acc))[..., None, None].unbind(0)  # [B, H, 1, 1]
        M_all = M_all[..., :-1].unflatten(-1, (D, E))
    if doc_ids is None:
        whole = cont = torch.ones(W, B, dtype=torch.bool, device=q_BHCD.device)
    else:
        ends = all_gather_nograd(torch.stack([doc_ids[:, 0], doc_ids[:, -1]]), group)  # [W,2,B]
        whole = ends[:, 0] == ends[:, 1]
        cont = torch.zeros_like(whole)
        cont[1:] = ends[1:, 0] == ends[:-1, 1]
    # Every rank's output must depend on the gathered states, rank 0's too (with weight 0):
    # the gather's backward is itself a collective that all ranks have to enter.
    state = M_all[0] * 0
    for s in range(r):
        keep = (whole[s] & cont[s]).to(acc)[:, None, None, None]
        state = M_all[s] + keep * carries[s] * state
    state = state * cont[r].to(acc)[:, None, None, None]
    if g is None:
        t = torch.arange(C, device=q_BHCD.device, dtype=acc)
        q_decay = torch.exp(-slopes_H.to(acc)[:, None] * (t + 1))[None, :, :, None]  # [1,H,C,1]
    else:
        q_decay = torch.exp(G)[..., None]  # [B, H, C, 1]
    inter = (q_BHCD.to(acc) * q_decay) @ state
    if doc_ids is not None:
        inter = inter * (doc_ids == doc_ids[:, :1]).to(acc)[:, None, :, None]
    return (local.to(acc) + inter).to(q_BHCD.dtype)


def based_attention_lasp2(
    q_BHCF: torch.Tensor,
    k_BHCF: torch.Tensor,
    v_BHCE: torch.Tensor,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    block: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """LASP-2 for Based linear attention: numerator and normaliser are one decay-free linear
    attention over the Taylor features with the values augmented by a ones column (as in
    kernels/based), so they share lightning's LASP-2 -- one all-gather of [F, E+1] states."""
    from plait.kernels.based import feature_map

    E = v_BHCE.shape[-1]
    acc = torch.promote_types(v_BHCE.dtype, torch.float32)
    v_aug = torch.cat([v_BHCE.to(acc), torch.ones_like(v_BHCE[..., :1], dtype=acc)], dim=-1)
    zeros = torch.zeros(q_BHCF.shape[1], device=q_BHCF.device)
    out = lightning_attention_lasp2(
        feature_map(q_BHCF), feature_map(k_BHCF), v_aug, zeros, group, doc_ids=doc_ids,
        block=block, backend=backend,
    )
    return (out[..., :E] / (out[..., E:] + eps)).to(v_BHCE.dtype)
