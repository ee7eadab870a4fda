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

from plait.kernels.lightning import lightning_attention

from .lasp2 import lightning_attention_lasp2
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

    def local_index(self, T: int) -> torch.Tensor:
        """Indices of this rank's tokens in a sequence of T tokens (its layout)."""
        parts = 2 * self.world if self.zigzag else self.world
        if T % parts:
            raise ValueError(
                f"data.seq_len: {T} tokens cannot be split evenly into {parts} chunks "
                f"(context_parallel={self.world}{', zigzag' if self.zigzag else ''})"
            )
        return layout_index(T, self.world, self.rank, self.zigzag)
