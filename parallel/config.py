"""Typed parallel layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.errors import UserError


class ParallelConfigError(UserError, ValueError):
    """A parallel field is invalid; the message names the field."""


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    """TP degree: heads, MLP inner dims and vocabulary are split across this many ranks."""
    pipeline_parallel: int = 1
    """PP degree: the layers are cut into this many stages (by ``|`` marks in the pattern or
    by the cost balancer), run by megatron-core's 1F1B schedule over ``training.grad_accum``
    micro-batches (parallel/pipeline.py). ``python -m plait.launcher.plan`` shows the stages."""
    virtual_pipeline: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B, bubble (p-1)/(v m + p-1)): needs
    pipeline_parallel > 1 and micro-batches (``training.grad_accum``) a multiple of
    pipeline_parallel (megatron's interleaved schedule)."""
    context_parallel: int = 1
    """Sequence-parallel degree: each sequence is split in contiguous chunks over this many
    ranks; linear layers use LASP-2 and softmax layers LASP-2H (parallel/sequence.py)."""
    softmax_sp: Literal["lasp2h", "ring"] = "lasp2h"
    """Sequence-parallel scheme of the softmax layers: LASP-2H (all-gather K, V; the default
    for hybrids) or Ring Attention (P2P ring; zigzag layout when every layer is softmax)."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (none), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters)."""

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel",
                     "virtual_pipeline"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.virtual_pipeline > 1 and self.pipeline_parallel == 1:
            raise ParallelConfigError(
                f"virtual_pipeline: {self.virtual_pipeline} chunks per rank need "
                "pipeline_parallel > 1"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ParallelConfigError(
                f"zero_stage: {self.zero_stage} is not one of the allowed values 0, 1, 2, 3"
            )

    def check_trainable(self) -> None:
        """What training (and evaluation) cannot run, refused before any process starts
        work: the config itself is valid, so the planner reads it.

        Pipeline stages compose with ZeRO 0, 1 and 2 (the engine reduces and steps once after
        megatron's schedule). ZeRO-3 under stages is refused: its parameters are gathered only
        inside their own module's forward, and that has not been run or tested through
        megatron's schedules here (its checkpoints are the same logical format as the rest)."""
        if self.pipeline_parallel > 1 and self.zero_stage == 3:
            raise ParallelConfigError(
                "zero_stage: 3 is not supported with pipeline_parallel > 1 (untested under "
                "megatron's schedules); use zero_stage 0, 1 or 2"
            )

    def data_parallel(self, world_size: int) -> int:
        model_ranks = self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        if world_size % model_ranks:
            how = (f"; start a multiple of {model_ranks} processes (torchrun --nproc_per_node "
                   f"{model_ranks}, or srun with {model_ranks} tasks)" if world_size == 1 else "")
            raise ParallelConfigError(
                f"tensor_parallel x pipeline_parallel x context_parallel = {model_ranks} does not "
                f"divide the world size {world_size}{how}"
            )
        return world_size // model_ranks
