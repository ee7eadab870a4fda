"""The ``mpu`` object DeepSpeed expects, over megatron-core's parallel_state.

megatron-core's parallel_state lacks the ``get_model_parallel_*`` names DeepSpeed calls, so
it cannot be passed as-is. Choices made here:
  * DeepSpeed's "model parallel" group is the tensor-parallel group, and with pipeline stages
    the TP x PP group: DeepSpeed reduces the gradient norm over it (each stage holds other
    tensors; with the TP group alone every stage would clip by its own norm: measured 2.6e-2
    off in the weights), and counts replicated tensors on its rank 0 only: the rank stays
    the TP rank, so each stage counts its own replicated tensors (the last stage's copy of a
    tied embedding is marked ``ds_pipe_replicated`` and skipped).
  * DeepSpeed's "data parallel" group is megatron's data-parallel group *with* the context-
    parallel ranks: ranks that hold different parts of one sequence must average their
    gradients exactly as data-parallel replicas do, and ZeRO partitions over all of them.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps


class MegatronMpu:
    # tensor parallel
    def get_tensor_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # "model parallel" in DeepSpeed's sense (see module docstring)
    def get_model_parallel_group(self):
        if ps.get_pipeline_model_parallel_world_size() > 1:
            return ps.get_model_parallel_group()  # TP x PP
        return ps.get_tensor_model_parallel_group()

    get_model_parallel_rank = get_tensor_model_parallel_rank
    get_model_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size

    # data parallel (including context-parallel ranks)
    def get_data_parallel_group(self):
        return ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank(with_context_parallel=True)

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size(with_context_parallel=True)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    # pipeline
    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return ps.get_pipeline_model_parallel_world_size()

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
