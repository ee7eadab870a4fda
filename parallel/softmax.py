"""Softmax attention in a sequence-parallel context: the scheme dispatch (plain SDPA, LASP-2H
or Ring Attention), the all-gathered keys of queries that pick their own keys (MoH's routed
heads), and windowed attention over the compressed active tokens of the whole sequence
(SeqBoat). Each function takes the ``SequenceParallel`` context first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from plait.kernels.attention import causal_attention

from .collectives import all_gather, all_gather_nograd
from .lasp2h import attention_lasp2h
from .ring import layout_index, ring_attention

if TYPE_CHECKING:
    from .sequence import SequenceParallel


def attention(sp: SequenceParallel, q, k, v, doc_ids=None) -> torch.Tensor:
    """Causal softmax attention within documents in the context ``sp``: one rank,
    kernels/attention (causal SDPA per document); several, LASP-2H (all-gather K, V) or Ring
    Attention as ``parallel.softmax_sp`` says (letter A)."""
    if sp.world > 1 and sp.softmax == "ring":
        index = sp.local_index(q.shape[2] * sp.world).to(q.device)
        return ring_attention(q, k, v, index, sp.group, doc_ids=doc_ids)
    if sp.world > 1:
        return attention_lasp2h(q, k, v, sp.group, doc_ids=doc_ids)
    # Causal within documents without a [T, T] mask: one causal call per document on CPU,
    # flash attention's varlen kernel on CUDA (kernels/attention).
    return causal_attention(q, k, v, doc_ids=doc_ids)


def gather_keys(sp: SequenceParallel, k, v, doc_ids=None):
    """Keys and values of the whole sequence for queries that pick their own keys (MoH's
    routed heads): LASP-2H's all-gather. Returns (k_all, v_all [B, H, W*C, D], the global
    index of each key [W*C], its doc ids [B, W*C] or None, the global index of each local
    query [C])."""
    B, H, C, _ = k.shape
    q_index = sp.local_index(C * sp.world).to(k.device)
    if sp.world == 1:
        return k, v, q_index, doc_ids, q_index

    def cat(x):  # [W, B, H, C, D] -> [B, H, W*C, D]
        return x.permute(1, 2, 0, 3, 4).reshape(B, H, sp.world * C, -1)

    k_all, v_all = cat(all_gather(k, sp.group)), cat(all_gather(v, sp.group))
    k_index = torch.cat(
        [layout_index(C * sp.world, sp.world, r, sp.zigzag) for r in range(sp.world)]
    ).to(k.device)
    docs = None
    if doc_ids is not None:
        docs = all_gather_nograd(doc_ids, sp.group).transpose(0, 1).reshape(B, -1)
    return k_all, v_all, k_index, docs, q_index


def active_window(sp: SequenceParallel, attend, q, k, v, docs, counts, window: int) -> torch.Tensor:
    """Windowed attention over the *compressed* active tokens of the whole sequence
    (SeqBoat): query i (in compressed order) is given the compressed keys from the start of
    the previous ``window``-aligned chunk up to itself, wherever those tokens live, and
    ``attend`` keeps its own band within them (SeqBoat's exact window of ``window`` keys,
    i - window < j <= i, always lies inside).

    q, k [B, n, Z], v [B, n, E], docs [B, n] or None: this rank's active tokens in order,
    valid where j < counts[b]. ``attend(q, k, v, docs, valid)`` runs the windowed attention
    on a compressed sequence whose index 0 starts a chunk. Returns [B, n, E].

    Across ranks the number of active tokens before this rank's first one is data-
    dependent, so every rank's active keys and values are all-gathered (LASP-2H's scheme,
    bytes proportional to the active tokens) and each rank attends over an extended
    sequence: the global compressed chunk before its first token's chunk, then its own.
    """
    B, n = q.shape[:2]
    if sp.world == 1:
        valid = torch.arange(n, device=q.device)[None] < counts[:, None]
        return attend(q, k, v, docs, valid)
    sp.require_contiguous("SeqBoat's compressed attention")
    W, r, w = sp.world, sp.rank, window
    all_counts = all_gather_nograd(counts, sp.group)  # [W, B]
    N = max(int(all_counts.max()), 1)
    starts = torch.cumsum(all_counts, 0) - all_counts  # first global index per rank, row
    offset = starts[r]  # [B]
    base = torch.div(offset, w, rounding_mode="floor") * w - w  # a chunk start, maybe < 0
    E = 2 * w + N
    j = torch.arange(N, device=q.device)

    def pad(x, fill=0):
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, N - n), value=fill)

    if docs is None:
        docs = torch.zeros(B, n, dtype=torch.long, device=q.device)
    kg = all_gather(pad(k), sp.group)  # [W, B, N, Z]
    vg = all_gather(pad(v), sp.group)
    dg = all_gather_nograd(pad(docs, -1), sp.group)  # [W, B, N]
    g_index = starts[:, :, None] + j  # [W, B, N] global compressed index
    ok = (j < all_counts[:, :, None]) & (torch.arange(W, device=q.device) <= r)[:, None, None]
    e = g_index - base[None, :, None]
    ok &= (e >= 0) & (e < E)
    e = torch.where(ok, e, torch.full_like(e, E))  # the dump slot, dropped below
    e_flat = e.permute(1, 0, 2).reshape(B, W * N)  # [B, W*N]

    def spread(x_g, fill=0.0):  # [W, B, N, *] -> [B, E, *]
        flat = x_g.transpose(0, 1).reshape(B, W * N, *x_g.shape[3:])
        out = flat.new_full((B, E + 1, *flat.shape[2:]), fill)
        idx = e_flat.view(B, W * N, *[1] * (flat.dim() - 2)).expand_as(flat)
        return out.scatter(1, idx, flat)[:, :E]

    ke, ve = spread(kg), spread(vg)
    de = spread(dg, -1)
    valid_e = spread(ok.to(torch.long)).bool()
    e_local = (offset - base)[:, None] + torch.arange(n, device=q.device)  # [B, n]
    qe = q.new_zeros(B, E + 1, q.shape[-1])
    qe = qe.scatter(1, e_local[..., None].expand_as(q), q)[:, :E]
    out = attend(qe, ke, ve, de, valid_e)  # [B, E, E_v]
    return out.gather(1, e_local[..., None].expand(B, n, out.shape[-1]))
