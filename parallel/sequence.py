"""The sequence-parallel context a model is built with.

Models never open process groups or call collectives themselves: a mixer asks this object
for its operator, and gets the plain kernel when the context-parallel group has one rank, or
the sequence-parallel form (LASP-2 for linear layers, LASP-2H for softmax layers) otherwise.
Each rank then holds a contiguous chunk of every sequence (the loader's layout for LASP-2),
with global positions and document ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.kernels.based import based_attention
from plait.kernels.lightning import lightning_attention
from plait.kernels.swa import swa

from .collectives import all_gather, all_gather_nograd, all_reduce_sum
from .convs import diag_ssm_sp, long_conv_sp, short_conv_sp
from .halo import swa_sp
from .lasp2 import based_attention_lasp2, lightning_attention_lasp2
from .lasp2h import attention_lasp2h
from .ring import layout_index, ring_attention


@dataclass(frozen=True)
class SequenceParallel:
    group: dist.ProcessGroup | None = None
    softmax: str = "lasp2h"
    """Scheme of the softmax layers: "lasp2h" (all-gather K, V) or "ring" (Ring Attention)."""
    zigzag: bool = False
    """Token layout: contiguous chunks (what LASP-2 needs) or zigzag (2W chunks, rank r holds
    r and 2W-1-r: balanced causal work for ring attention in all-softmax models)."""

    @classmethod
    def from_parallel_state(cls, softmax: str = "lasp2h", zigzag: bool = False) -> SequenceParallel:
        from megatron.core import parallel_state as ps

        if softmax not in ("lasp2h", "ring"):
            raise ValueError(f"parallel.softmax_sp: {softmax!r} is not 'lasp2h' or 'ring'")
        if zigzag and softmax != "ring":
            raise ValueError("zigzag layout is for ring attention only")
        if ps.get_context_parallel_world_size() == 1:
            return cls(None)
        return cls(ps.get_context_parallel_group(), softmax, zigzag)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.group is not None else 0

    def lightning(self, q, k, v, slopes, doc_ids=None, block: int = 64) -> torch.Tensor:
        if self.zigzag:
            raise ValueError("LASP-2 needs the contiguous layout; zigzag is for all-softmax models")
        if self.world == 1:
            return lightning_attention(q, k, v, slopes, doc_ids=doc_ids, block=block)
        return lightning_attention_lasp2(q, k, v, slopes, self.group, doc_ids=doc_ids, block=block)

    def _contiguous(self, what: str) -> None:
        if self.zigzag:
            raise ValueError(
                f"{what} needs the contiguous layout; zigzag is for all-softmax models"
            )

    def based(self, q, k, v, doc_ids=None, eps: float = 1e-6, block: int = 64) -> torch.Tensor:
        """Based linear attention (LASP-2 over the Taylor-feature states)."""
        self._contiguous("Based linear attention")
        if self.world == 1:
            return based_attention(q, k, v, doc_ids=doc_ids, eps=eps, block=block)
        return based_attention_lasp2(q, k, v, self.group, doc_ids=doc_ids, eps=eps, block=block)

    def window(self, q, k, v, window: int, doc_ids=None) -> torch.Tensor:
        """Sliding-window attention (halo exchange of the last window - 1 keys and values)."""
        self._contiguous("sliding-window attention")
        if self.world == 1:
            return swa(q, k, v, window, doc_ids=doc_ids)
        return swa_sp(q, k, v, window, self.group, doc_ids=doc_ids)

    def short_conv(self, x, w, bias=None, doc_ids=None) -> torch.Tensor:
        """Depthwise causal convolution [B, T, C] (halo of K - 1 tokens)."""
        self._contiguous("short convolution")
        return short_conv_sp(x, w, bias, self.group if self.world > 1 else None, doc_ids=doc_ids)

    def long_conv(self, u, k, doc_ids=None) -> torch.Tensor:
        """Causal long convolution [B, T, C] with kernel [C, L] (halo or gathered prefix)."""
        self._contiguous("long convolution")
        return long_conv_sp(u, k, self.group if self.world > 1 else None, doc_ids=doc_ids)

    def diag_ssm(self, u, log_dt, A, C, doc_ids=None) -> torch.Tensor:
        """S4D diagonal SSM as a convolution (state passing across ranks)."""
        self._contiguous("diagonal SSM")
        group = self.group if self.world > 1 else None
        return diag_ssm_sp(u, log_dt, A, C, group, doc_ids=doc_ids)

    def attention(self, q, k, v, doc_ids=None) -> torch.Tensor:
        if self.world > 1 and self.softmax == "ring":
            index = self.local_index(q.shape[2] * self.world).to(q.device)
            return ring_attention(q, k, v, index, self.group, doc_ids=doc_ids)
        if self.world > 1:
            return attention_lasp2h(q, k, v, self.group, doc_ids=doc_ids)
        if doc_ids is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # Causal and within-document. A dense [B, 1, T, T] mask: fine at the lengths the
        # softmax layers see on CPU; varlen flash attention replaces it on GPUs.
        T = q.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])

    def gather_keys(self, k, v, doc_ids=None):
        """Keys and values of the whole sequence for queries that pick their own keys (MoH's
        routed heads): LASP-2H's all-gather. Returns (k_all, v_all [B, H, W*C, D], the global
        index of each key [W*C], its doc ids [B, W*C] or None, the global index of each local
        query [C])."""
        B, H, C, _ = k.shape
        q_index = self.local_index(C * self.world).to(k.device)
        if self.world == 1:
            return k, v, q_index, doc_ids, q_index

        def cat(x):  # [W, B, H, C, D] -> [B, H, W*C, D]
            return x.permute(1, 2, 0, 3, 4).reshape(B, H, self.world * C, -1)

        k_all, v_all = cat(all_gather(k, self.group)), cat(all_gather(v, self.group))
        k_index = torch.cat(
            [layout_index(C * self.world, self.world, r, self.zigzag) for r in range(self.world)]
        ).to(k.device)
        docs = None
        if doc_ids is not None:
            docs = all_gather_nograd(doc_ids, self.group).transpose(0, 1).reshape(B, -1)
        return k_all, v_all, k_index, docs, q_index

    def active_window(self, attend, q, k, v, docs, counts, window: int) -> torch.Tensor:
        """Windowed attention over the *compressed* active tokens of the whole sequence
        (SeqBoat): query i (in compressed order) sees compressed keys from the start of the
        previous ``window`` chunk up to itself, wherever those tokens live.

        q, k [B, n, Z], v [B, n, E], docs [B, n] or None: this rank's active tokens in order,
        valid where j < counts[b]. ``attend(q, k, v, docs, valid)`` runs the windowed attention
        on a compressed sequence whose index 0 starts a chunk. Returns [B, n, E].

        Across ranks the number of active tokens before this rank's first one is data-
        dependent, so every rank's active keys and values are all-gathered (LASP-2H's scheme,
        bytes proportional to the active tokens) and each rank attends over an extended
        sequence: the global compressed chunk before its first token's chunk, then its own.
        """
        B, n = q.shape[:2]
        if self.world == 1:
            valid = torch.arange(n, device=q.device)[None] < counts[:, None]
            return attend(q, k, v, docs, valid)
        self._contiguous("SeqBoat's compressed attention")
        W, r, w = self.world, self.rank, window
        all_counts = all_gather_nograd(counts, self.group)  # [W, B]
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
        kg = all_gather(pad(k), self.group)  # [W, B, N, Z]
        vg = all_gather(pad(v), self.group)
        dg = all_gather_nograd(pad(docs, -1), self.group)  # [W, B, N]
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

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of a per-rank statistic over the sequence-parallel ranks (all-reduce forward
        and backward), so that sequence-level quantities such as MoH's balance loss equal the
        single-process ones."""
        return all_reduce_sum(x, self.group) / self.world if self.world > 1 else x

    def local_index(self, T: int) -> torch.Tensor:
        """Indices of this rank's tokens in a sequence of T tokens (its layout)."""
        parts = 2 * self.world if self.zigzag else self.world
        if T % parts:
            raise ValueError(
                f"data.seq_len: {T} tokens cannot be split evenly into {parts} chunks "
                f"(context_parallel={self.world}{', zigzag' if self.zigzag else ''})"
            )
        return layout_index(T, self.world, self.rank, self.zigzag)
