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
