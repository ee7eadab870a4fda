"""The ``mpu`` object DeepSpeed expects, over megatron-core's parallel_state.

megatron-core's parallel_state lacks the ``get_model_parallel_*`` names DeepSpeed calls, so
it cannot be passed as-is. Choices made here:
  * DeepSpeed's "model parallel" group is the tensor-parallel group: DeepSpeed uses it to
    reduce gradient norms of TP-sharded tensors and to count replicated tensors once.
    (Pipeline stages, when they land, add their own norm reduction in parallel/pipeline.py.)
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

    # "model parallel" in DeepSpeed's sense = TP (see module docstring)
    get_model_parallel_group = get_tensor_model_parallel_group
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
