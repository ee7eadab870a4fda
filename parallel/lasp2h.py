"""LASP-2H: sequence parallelism for the softmax-attention layers of a hybrid.

Every rank all-gathers K and V of the whole sequence over the context-parallel group and
attends with its own queries (global positions rC + i) causally, within documents. The
backward returns dK, dV to their owners through the all-gather's backward (a reduce-scatter
on NCCL). K/V traffic grows with the sequence length -- the price of exact softmax attention;
the hybrid keeps few such layers. Rotary positions must be applied with global positions
before the call.

No [C, W*C] mask is built: the contiguous layout makes "causal within documents" a few
plain pieces. The rank's queries are cut at their document boundaries; a document that
starts on this rank is ordinary causal attention over its own keys (one causal SDPA call,
the flash kernel); the one document that may have started on an earlier rank (the whole
chunk when there are no documents) sees all of its earlier keys plus causal keys of its
own: kernels/attention's ``prefix_causal_attention`` (on CPU two flash calls merged by
their log-sum-exp; on CUDA SDPA with a bottom-right causal bias, which torch runs in its
flash or memory-efficient kernel). A masked SDPA call would take the CPU's math path
instead (scores materialised, no causal skip): 4-7x slower at 8K tokens and O(C * W * C)
memory; ``attention_lasp2h_masked`` keeps that form as the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.kernels.attention.prefix import prefix_causal_attention
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
    prefix_backend: str = "auto",
) -> torch.Tensor:
    """q, k [B, H, C, D], v [B, H, C, E]: this rank's chunk (global positions rC on);
    ``doc_ids`` [B, C] the chunk's document ids. ``prefix_backend``: kernels/attention's
    ``prefix_causal_attention`` backend for the document begun on an earlier rank."""
    W = dist.get_world_size(group) if group is not None else 1
    r = dist.get_rank(group) if group is not None else 0
    B, H, C, D = q_BHCD.shape
    K = all_gather(k_BHCD, group).permute(1, 2, 0, 3, 4).reshape(B, H, W * C, D)
    V = all_gather(v_BHCE, group).permute(1, 2, 0, 3, 4).reshape(B, H, W * C, -1)
    all_docs = None
    if doc_ids is not None:
        all_docs = all_gather_nograd(doc_ids, group).permute(1, 0, 2).reshape(B, W * C)
    scale = D**-0.5 if scale is None else scale
    chunk = functools.partial(_chunk, scale=scale, backend=prefix_backend)
    if doc_ids is None:
        return chunk(q_BHCD, K, V, r * C, [C], 0)
    rows = [
        (lengths, _first_start(all_docs[b], r * C))
        for b, lengths in enumerate(document_lengths(doc_ids))
    ]
    if all(row == rows[0] for row in rows):  # shared boundaries (always at B = 1)
        return chunk(q_BHCD, K, V, r * C, *rows[0])
    pieces = zip(q_BHCD.unbind(0), K.unbind(0), V.unbind(0), rows, strict=True)
    return torch.stack(
        [chunk(q[None], k[None], v[None], r * C, *row)[0] for q, k, v, row in pieces]
    )


def attention_lasp2h_masked(q_BHCD, K_BHSD, V_BHSE, r, doc_ids, all_docs, scale):
    """The dense-mask form: queries at rC + i see keys j <= rC + i of their document. The
    reference the per-document path is tested against."""
    C, S = q_BHCD.shape[2], K_BHSD.shape[2]
    qpos = r * C + torch.arange(C, device=q_BHCD.device)
    kpos = torch.arange(S, device=q_BHCD.device)
    mask = (kpos[None, :] <= qpos[:, None])[None]  # [1, C, W*C]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == all_docs[:, None, :])
    return F.scaled_dot_product_attention(q_BHCD, K_BHSD, V_BHSE, attn_mask=mask[:, None],
                                          scale=scale)


def _first_start(all_docs_S: torch.Tensor, offset: int) -> int:
    """Global index where the document of token ``offset`` starts (documents are contiguous
    runs of one id)."""
    if offset == 0:
        return 0
    same = all_docs_S[:offset].flip(0) == all_docs_S[offset]
    return offset - int(same.long().cumprod(0).sum())


def _chunk(q, K, V, offset: int, lengths: list[int], start: int, scale: float, backend: str):
    """This rank's queries (global ``offset`` on) cut into documents of ``lengths``; the first
    one started at global ``start`` <= offset, so it sees keys ``start`` .. its own. K, V are
    split once (not sliced per piece: each slice's backward would allocate a full-size
    gradient)."""
    C = q.shape[2]
    sizes = [start, offset - start + lengths[0], *lengths[1:], K.shape[2] - offset - C]
    _, *k_doc, _ = K.split(sizes, 2)
    _, *v_doc, _ = V.split(sizes, 2)
    outs = [
        prefix_causal_attention(q_d, k_d, v_d, scale=scale, backend=backend)
        for q_d, k_d, v_d in zip(q.split(lengths, 2), k_doc, v_doc, strict=True)
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)
