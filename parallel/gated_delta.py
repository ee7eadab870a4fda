"""Sequence parallelism for the gated delta rule (Gated DeltaNet), in LASP-2's spirit.

The delta rule's state map is affine in the state a segment starts from: over rank r's C
tokens, S_out = P_r S_in + M_r, with P_r [K, K] per head (the product of the tokens'
exp(g) (I - beta k k^T)) and M_r [K, V] (the segment run from a zero state). The value
columns of the rule evolve independently, so one chunked pass over the values augmented
with K zero columns, from the initial state [0 | I], yields both: its final state is
[M_r | P_r], and its output is [o_r | X_r] with o_r the local output (zero start) and X_r
[C, K] the map from S_in to the output (o = o_r + X_r S_in). One all-gather of the [K, V + K]
pairs (bytes independent of the sequence length), a prefix combine

    S_in(0) = 0,   S_in(s + 1) = [rank s + 1 continues rank s's last document] (P_s S_in(s) + M_s)

and each rank adds X_r S_in(r). Documents cut the carry where they start: inside a segment
the kernel itself zeroes P (its last document did not start from S_in) and X on the tokens
after the segment's first document; at a rank border the combine's indicator does. The
backward is autograd's through these pieces and through the differentiable all-gather
(parallel/collectives.py), as in parallel/lasp2.py.

Cost against the plain kernel: the pass carries V + K value columns instead of V (twice the
state work for Qwen3.5's K = V = 128); no second pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plait.kernels.gated_delta import gated_delta_rule

from .collectives import all_gather, all_gather_nograd

if TYPE_CHECKING:
    from .sequence import SequenceParallel


def gated_delta(sp: SequenceParallel, q, k, v, g, beta, doc_ids=None, block: int = 64):
    """The gated delta rule in the context ``sp``: the plain kernel on one rank, the
    state-passing form above over the context-parallel group otherwise (letter G)."""
    sp.require_contiguous("the gated delta rule (state passing)")
    if sp.world == 1:
        return gated_delta_rule(q, k, v, g, beta, doc_ids=doc_ids, block=block)
    return gated_delta_sp(q, k, v, g, beta, sp.group, doc_ids=doc_ids, block=block)


def gated_delta_sp(
    q_BHCK: torch.Tensor,
    k_BHCK: torch.Tensor,
    v_BHCV: torch.Tensor,
    g_BHC: torch.Tensor,
    beta_BHC: torch.Tensor,
    group,
    *,
    doc_ids: torch.Tensor | None = None,
    block: int = 64,
) -> torch.Tensor:
    W = dist.get_world_size(group) if group is not None else 1
    r = dist.get_rank(group) if group is not None else 0
    acc = torch.promote_types(q_BHCK.dtype, torch.float32)
    B, H, C, K = q_BHCK.shape
    V = v_BHCV.shape[-1]
    v_aug = torch.cat([v_BHCV.to(acc), v_BHCV.new_zeros(B, H, C, K, dtype=acc)], dim=-1)
    eye = torch.eye(K, dtype=acc, device=q_BHCK.device).expand(B, H, K, K)
    s0 = torch.cat([eye.new_zeros(B, H, K, V), eye], dim=-1)
    out, state = gated_delta_rule(
        q_BHCK, k_BHCK, v_aug, g_BHC, beta_BHC, doc_ids=doc_ids, initial_state=s0,
        return_state=True, block=block,
    )
    local, X = out[..., :V].to(acc), out[..., V:].to(acc)
    pairs = all_gather(state, group)  # [W, B, H, K, V + K]
    if doc_ids is None:
        cont = torch.ones(W, B, dtype=torch.bool, device=q_BHCK.device)
    else:
        ends = all_gather_nograd(torch.stack([doc_ids[:, 0], doc_ids[:, -1]]), group)  # [W,2,B]
        cont = torch.zeros(W, B, dtype=torch.bool, device=q_BHCK.device)
        cont[1:] = ends[1:, 0] == ends[:-1, 1]
    # Every rank's output depends on the gathered pairs (rank 0's with weight 0): the
    # gather's backward is a collective all ranks must enter.
    S_in = pairs[0][..., :V] * 0
    for s in range(r):
        M, P = pairs[s][..., :V], pairs[s][..., V:]
        S_in = (P @ S_in + M) * cont[s + 1].to(acc)[:, None, None, None]
    return (local + X @ S_in).to(q_BHCK.dtype)
