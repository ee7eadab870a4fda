"""LASP-2H: sequence parallelism for the softmax-attention layers of a hybrid.

Every rank all-gathers K and V of the whole sequence over the context-parallel group and
attends with its own queries (global positions rC + i) causally, within documents. The
backward returns dK, dV to their owners through the all-gather's backward (a reduce-scatter
on NCCL). K/V traffic grows with the sequence length -- the price of exact softmax attention;
the hybrid keeps few such layers. Rotary positions must be applied with global positions
before the call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .collectives import all_gather, all_gather_nograd


def attention_lasp2h(
    q_BHCD: torch.Tensor,
    k_BHCD: torch.Tensor,
    v_BHCE: torch.Tensor,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    W = dist.get_world_size(group) if group is not None else 1
    r = dist.get_rank(group) if group is not None else 0
    B, H, C, D = q_BHCD.shape
    K = all_gather(k_BHCD, group).permute(1, 2, 0, 3, 4).reshape(B, H, W * C, D)
    V = all_gather(v_BHCE, group).permute(1, 2, 0, 3, 4).reshape(B, H, W * C, -1)
    qpos = r * C + torch.arange(C, device=q_BHCD.device)
    kpos = torch.arange(W * C, device=q_BHCD.device)
    mask = (kpos[None, :] <= qpos[:, None])[None]  # [1, C, W*C]
    if doc_ids is not None:
        all_docs = all_gather_nograd(doc_ids, group).permute(1, 0, 2).reshape(B, W * C)
        mask = mask & (doc_ids[:, :, None] == all_docs[:, None, :])
    return F.scaled_dot_product_attention(q_BHCD, K, V, attn_mask=mask[:, None], scale=scale)
