"""LASP-2H: sequence parallelism for the softmax-attention layers of a hybrid.

Every rank all-gathers K and V of the whole sequence over the context-parallel group and
attends with its own queries (global positions rC + i) causally, within documents. The
backward returns dK, dV to their owners through the all-gather's backward (a reduce-scatter
on NCCL). K/V traffic grows with the sequence length -- the price of exact softmax attention;
the hybrid keeps few such layers. Rotary positions must be applied with global positions
before the call.

On CPU no [C, W*C] mask is built: the contiguous layout makes "causal within documents" a
few plain pieces. The rank's queries are cut at their document boundaries; a document that
starts on this rank is ordinary causal attention over its own keys (one causal SDPA call,
the flash kernel); the one document that may have started on an earlier rank (the whole
chunk when there are no documents) sees all of its earlier keys plus causal keys of its
own, computed as two flash calls (the earlier keys unmasked, the own keys causal) merged by
their log-sum-exp (``_PrefixCausal``). A masked SDPA call would take the CPU's math path
instead (scores materialised, no causal skip): 4-7x slower at 8K tokens and O(C * W * C)
memory. On CUDA (the CPU flash operator does not exist there) the masked reference runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.kernels.docs import document_lengths

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
    all_docs = None
    if doc_ids is not None:
        all_docs = all_gather_nograd(doc_ids, group).permute(1, 0, 2).reshape(B, W * C)
    if q_BHCD.is_cuda:
        return attention_lasp2h_masked(q_BHCD, K, V, r, doc_ids, all_docs, scale)
    scale = D**-0.5 if scale is None else scale
    if doc_ids is None:
        return _chunk(q_BHCD, K, V, r * C, [C], 0, scale)
    rows = [
        (lengths, _first_start(all_docs[b], r * C))
        for b, lengths in enumerate(document_lengths(doc_ids))
    ]
    if all(row == rows[0] for row in rows):  # shared boundaries (always at B = 1)
        return _chunk(q_BHCD, K, V, r * C, *rows[0], scale)
    pieces = zip(q_BHCD.unbind(0), K.unbind(0), V.unbind(0), rows, strict=True)
    return torch.stack(
        [_chunk(q[None], k[None], v[None], r * C, *row, scale)[0] for q, k, v, row in pieces]
    )


def attention_lasp2h_masked(q_BHCD, K_BHSD, V_BHSE, r, doc_ids, all_docs, scale):
    """The dense-mask form: queries at rC + i see keys j <= rC + i of their document. The
    reference for the per-document path, and the path on CUDA."""
    C, S = q_BHCD.shape[2], K_BHSD.shape[2]
    qpos = r * C + torch.arange(C, device=q_BHCD.device)
    kpos = torch.arange(S, device=q_BHCD.device)
    mask = (kpos[None, :] <= qpos[:, None])[None]  # [1, C, W*C]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == all_docs[:, None, :])
    return F.scaled_dot_product_attention(q_BHCD, K_BHSD, V_BHSE, attn_mask=mask[:, None],
                                          scale=scale)  # fmt: skip


def _first_start(all_docs_S: torch.Tensor, offset: int) -> int:
    """Global index where the document of token ``offset`` starts (documents are contiguous
    runs of one id)."""
    if offset == 0:
        return 0
    same = all_docs_S[:offset].flip(0) == all_docs_S[offset]
    return offset - int(same.long().cumprod(0).sum())


def _chunk(q, K, V, offset: int, lengths: list[int], start: int, scale: float):
    """This rank's queries (global ``offset`` on) cut into documents of ``lengths``; the first
    one started at global ``start`` <= offset. K, V are split once (not sliced per piece:
    each slice's backward would allocate a full-size gradient)."""
    C = q.shape[2]
    sizes = [start, offset - start, *lengths, K.shape[2] - offset - C]
    _, k_prev, *k_own, _ = K.split(sizes, 2)
    _, v_prev, *v_own, _ = V.split(sizes, 2)
    outs = []
    for i, (q_d, k_d, v_d) in enumerate(zip(q.split(lengths, 2), k_own, v_own, strict=True)):
        if i == 0 and offset > start:
            outs.append(_PrefixCausal.apply(q_d, k_prev, v_prev, k_d, v_d, scale))
        else:
            outs.append(F.scaled_dot_product_attention(q_d, k_d, v_d, is_causal=True, scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixCausal(torch.autograd.Function):
    """Queries [L] that see every key of ``k_prev`` [P] and causally the keys of ``k_own``
    [L]: one unmasked and one causal flash call (torch's CPU flash operator, which also
    returns the row log-sum-exp), merged as softmax over the union of the keys.

    Backward: each part's flash backward is given the merged output and the merged
    log-sum-exp, so it recomputes the probabilities of the union (exp(s - lse)) and the
    union's rowsum(dO * O): the exact gradient of the whole, the way ring-flash-attention
    combines blocks."""

    @staticmethod
    def forward(ctx, q, k_prev, v_prev, k_own, v_own, scale):
        o1, l1 = _flash(q, k_prev, v_prev, 0.0, False, scale=scale)
        o2, l2 = _flash(q, k_own, v_own, 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        o = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k_prev, v_prev, k_own, v_own, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k_prev, v_prev, k_own, v_own, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq1, dkp, dvp = _flash_backward(do, q, k_prev, v_prev, o, lse, 0.0, False, scale=ctx.scale)
        dq2, dko, dvo = _flash_backward(do, q, k_own, v_own, o, lse, 0.0, True, scale=ctx.scale)
        return dq1 + dq2, dkp, dvp, dko, dvo, None
