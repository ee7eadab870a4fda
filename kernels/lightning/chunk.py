"""Chunked (Lightning Attention-2 tiled) causal linear attention with decay, in PyTorch.

The sequence is cut into blocks of ``block`` tokens:
  * intra-block: O_i = ((Q_i K_i^T) * D) V_i, with D[a, b] = lambda^(a - b) for a >= b;
  * inter-block: O_i += (Q_i * lambda^(a + 1)) S_i, where S_i is the running state
    carried from the previous blocks and updated as
    S_{i+1} = lambda^Bk S_i + (K_i * lambda^(Bk - 1 - b))^T V_i.
The state is kept in float32 whatever the input dtype: it is a sum over the whole prefix
and loses precision first. Cost is O(T * Bk * d) + O(T * d * e), linear in T.

The last block is zero-padded; padded keys and values are zero, so they add nothing to
the state, and padded outputs are cut off. Gradients come from autograd through this
function. The scan over blocks iterates over ``unbind`` views: indexing a tensor inside
the loop would make every step's backward allocate a full-size gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lightning_attention_chunk(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    block: int = 64,
) -> torch.Tensor:
    B, H, T, D = q_BHTD.shape
    E = v_BHTE.shape[-1]
    out_dtype = q_BHTD.dtype
    acc = torch.promote_types(q_BHTD.dtype, torch.float32)
    n = -(-T // block)
    pad = n * block - T
    q, k, v = (x.to(acc) for x in (q_BHTD, k_BHTD, v_BHTE))
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q_BHNCD = q.view(B, H, n, block, D)
    k_BHNCD = k.view(B, H, n, block, D)
    v_BHNCE = v.view(B, H, n, block, E)

    s_H = slopes_H.to(acc)
    pos_C = torch.arange(block, device=q.device, dtype=acc)
    # Intra-block decay mask, [H, C, C].
    dist_CC = pos_C[:, None] - pos_C[None, :]
    expo_HCC = (-s_H[:, None, None] * dist_CC).masked_fill(dist_CC < 0, float("-inf"))
    D_HCC = torch.exp(expo_HCC)
    q_decay_HC1 = torch.exp(-s_H[:, None] * (pos_C + 1))[..., None]  # lambda^(a+1)
    k_decay_HC1 = torch.exp(-s_H[:, None] * (block - 1 - pos_C))[..., None]  # lambda^(Bk-1-b)
    block_decay_H11 = torch.exp(-s_H * block)[:, None, None]  # lambda^Bk

    scores_BHNCC = torch.einsum("bhncd,bhnjd->bhncj", q_BHNCD, k_BHNCD) * D_HCC[:, None]
    o_intra = torch.einsum("bhncj,bhnje->bhnce", scores_BHNCC, v_BHNCE)

    # Per-block state contributions, then a sequential scan for the prefix states.
    kv_BHNDE = torch.einsum("bhncd,bhnce->bhnde", k_BHNCD * k_decay_HC1[:, None], v_BHNCE)
    state_BHDE = q.new_zeros(B, H, D, E)
    prefix = []
    for kv_i in kv_BHNDE.unbind(2):
        prefix.append(state_BHDE)
        state_BHDE = block_decay_H11 * state_BHDE + kv_i
    prefix_BHNDE = torch.stack(prefix, dim=2)
    o_inter = torch.einsum("bhncd,bhnde->bhnce", q_BHNCD * q_decay_HC1[:, None], prefix_BHNDE)

    out = (o_intra + o_inter).reshape(B, H, n * block, E)[:, :, :T]
    return out.to(out_dtype)
