"""The sequence-parallel context a model is built with.

Models never open process groups or call collectives themselves: a mixer is built with this
context (the group, the softmax scheme, the token layout) and hands it to its operator's
sequence-parallel form, a function in plait.parallel that runs the plain kernel when the
context-parallel group has one rank and the scheme otherwise: ``lasp2.lightning`` /
``lasp2.based`` (LASP-2 states), ``halo.window``, ``convs.short_conv`` / ``long_conv`` /
``diag_ssm``, ``softmax.attention`` (LASP-2H or Ring), ``softmax.gather_keys`` and
``softmax.active_window``. Which letter uses which is in its family entry
(``Letter.sequence_parallel``). Each rank holds a contiguous chunk of every sequence (the
loader's layout for LASP-2), or the zigzag layout for all-softmax models under ring attention,
with global positions and document ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .collectives import all_reduce_sum
from .ring import layout_index


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

    def require_contiguous(self, what: str) -> None:
        """Refuse the zigzag layout for an operator that passes state or halos from rank to
        rank (everything but softmax attention)."""
        if self.zigzag:
            raise ValueError(
                f"{what} needs the contiguous layout; zigzag is for all-softmax models"
            )

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
