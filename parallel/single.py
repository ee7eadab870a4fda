"""A process group of one, for building and running a model outside any launch.

megatron-core's layers read ``parallel_state`` even at TP=1 (their world sizes and ranks), so
a model cannot be built in a plain process (the export's self-check runs plait's model in the
exporting process, which no launcher started). ``runtime.initialize`` would do, but it also
publishes RANK/WORLD_SIZE/MASTER_* into the environment, tunes the allocator, reseeds every
RNG and patches megatron for CPU, all of which outlive the call; a process that goes on to
do other things (a test session, a notebook) should get back the state it had. This sets up
gloo over an in-memory store (no port) and megatron's groups at TP=PP=CP=1, and takes down
exactly what it set up.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch.distributed as dist

from plait.errors import UserError


class NotAlone(UserError, RuntimeError):
    """The process is already one rank of several: build the model in a process of its own."""


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """megatron's parallel state for one process (TP=1); a no-op where it already is one."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        if (
            ps.get_tensor_model_parallel_world_size() != 1
            or ps.get_pipeline_model_parallel_world_size() != 1
        ):
            raise NotAlone("this process is in a tensor- or pipeline-parallel group")
        yield
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        # megatron's group creation is a collective: the other ranks would never join it
        raise NotAlone(f"this process is one of {dist.get_world_size()} ranks")
    made_group = not dist.is_initialized()
    hook = sys.excepthook  # init_process_group wraps it (a "[rank0]:" prefix) for good
    if made_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            yield
        finally:
            ps.destroy_model_parallel()
    finally:
        if made_group:
            dist.destroy_process_group()
            sys.excepthook = hook
