"""Typed parallel layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class ParallelConfigError(ValueError):
    """A parallel field is invalid; the message names the field."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """TP degree: heads, MLP inner dims and vocabulary are split across this many ranks."""
    pipeline_parallel: int = 1
    """PP degree. ``python -m plait.launcher.plan`` shows the stages a run would use; training
    refuses > 1 at start-up until the schedules land (the pipeline issue)."""
    context_parallel: int = 1
    """Sequence-parallel degree: each sequence is split in contiguous chunks over this many
    ranks; linear layers use LASP-2 and softmax layers LASP-2H (parallel/sequence.py)."""
    softmax_sp: Literal["lasp2h", "ring"] = "lasp2h"
    """Sequence-parallel scheme of the softmax layers: LASP-2H (all-gather K, V; the default
    for hybrids) or Ring Attention (P2P ring; zigzag layout when every layer is softmax)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (none), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ParallelConfigError(
                f"zero_stage: {self.zero_stage} is not one of the allowed values 0, 1, 2, 3"
            )

    def check_trainable(self) -> None:
        """What training (and evaluation) cannot run yet, refused before any process starts
        work: the config itself is valid, so the planner reads it."""
        if self.pipeline_parallel != 1:
            raise ParallelConfigError(
                "pipeline_parallel: training with pipeline stages is not built yet (the "
                "process groups are); `python -m plait.launcher.plan` shows the stages"
            )

    def data_parallel(self, world_size: int) -> int:
        model_ranks = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % model_ranks:
            raise ParallelConfigError(
                f"tensor_parallel x pipeline_parallel x context_parallel = {model_ranks} does not "
                f"divide the world size {world_size}"
            )
        return world_size // model_ranks
