"""Distributed start-up: launcher environment, backend, megatron-core groups, seeds.

One call, ``initialize``, serves torchrun, the deepspeed launcher, Slurm's srun and a plain
single process alike: it reads the launcher's environment, picks nccl on CUDA and gloo on
CPU, initialises torch.distributed and megatron-core's parallel_state (TP, PP, CP, DP),
installs the CPU adaptations where CUDA is absent, and seeds every RNG.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_compat
from .config import ParallelConfig
from .cpu_heap import CpuHeap, HeapBound
from .cpu_heap import apply as apply_cpu_heap


@dataclass(frozen=True)
class LaunchEnv:
    """Who this process is, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    """"torchrun" (also the deepspeed launcher), "slurm" or "single"."""


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list such as ``gpu[003-005,010],cpu1`` (-> ``gpu003``)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST: cannot parse {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from e


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under
    ``srun`` without them, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and the first host of the
    node list are used (MASTER_PORT, if unset, is derived from the job id so that every task
    of a job agrees without talking)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = _int_env(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        return LaunchEnv(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, "SLURM_NTASKS"),
            local_rank=_int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR")
            or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=_int_env(env, "MASTER_PORT")
            if "MASTER_PORT" in env
            else 20000 + job % 20000,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


@dataclass(frozen=True)
class Runtime:
    """The parallel layout this process lives in."""

    env: LaunchEnv
    device: torch.device
    backend: str
    tp: int
    pp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    heap: HeapBound | None = None
    """``training.cpu_heap: bounded``'s bound on a CPU process, checking from its own
    thread (parallel/cpu_heap.py); None otherwise."""

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


def seed_everything(seed: int, pp_rank: int = 0) -> None:
    """Seed python, numpy, torch (CPU and CUDA) and megatron's model-parallel RNG tracker.

    Every TP and DP rank gets the same default seed (weights are initialised from the same
    master tensor and DeepSpeed checks DP replicas agree); pipeline stages differ (they own
    different layers). The tracker gives each TP rank its own stream for dropout inside
    tensor-parallel regions.
    """
    from megatron.core import tensor_parallel

    s = seed + 100 * pp_rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    tensor_parallel.model_parallel_cuda_manual_seed(s, force_reset_rng=True)


def initialize(
    parallel: ParallelConfig, seed: int, env: LaunchEnv | None = None,
    cpu_heap: CpuHeap = "release",
) -> Runtime:
    """Process groups, device, seeds; on CPU megatron's adaptations and the allocator
    (``cpu_heap``: TrainingConfig.cpu_heap, see parallel/cpu_heap.py)."""
    from megatron.core import parallel_state as ps

    parallel.validate()
    env = env or read_launch_env()
    # Publish the torchrun-style variables whatever launched us: DeepSpeed asserts LOCAL_RANK
    # and reads RANK / WORLD_SIZE itself (under srun or a single process nobody set them).
    for name, value in (
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
        ("MASTER_ADDR", env.master_addr),
        ("MASTER_PORT", env.master_port),
    ):
        os.environ[name] = str(value)
    dp = parallel.data_parallel(env.world_size)
    if torch.cuda.is_available():
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
        heap = None
    else:
        device = torch.device("cpu")
        backend = "gloo"
        cpu_compat.apply()
        heap = apply_cpu_heap(cpu_heap)
    if not dist.is_initialized() and env.world_size == 1:
        # One process rendezvous with itself: an in-memory store, no port to race for with
        # the other processes of the machine (tests and benchmarks start many at once).
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif not dist.is_initialized():
        try:
            dist.init_process_group(
                backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
            )
        except dist.DistNetworkError as e:
            if "EADDRINUSE" not in str(e):
                raise
            from plait.errors import UserError

            raise UserError(
                f"MASTER_PORT: the rendezvous port {env.master_port} on {env.master_addr} is "
                "taken by another process; set MASTER_PORT to a free port (under Slurm plait "
                "derives it from the job id: 20000 + id % 20000)"
            ) from None
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel,
            pipeline_model_parallel_size=parallel.pipeline_parallel,
            context_parallel_size=parallel.context_parallel,
            virtual_pipeline_model_parallel_size=(
                parallel.virtual_pipeline if parallel.virtual_pipeline > 1 else None
            ),
        )
    rt = Runtime(
        env=env,
        device=device,
        backend=backend,
        tp=parallel.tensor_parallel,
        pp=parallel.pipeline_parallel,
        cp=parallel.context_parallel,
        dp=dp,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        heap=heap,
    )
    seed_everything(seed, rt.pp_rank)
    return rt


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """All ranks wait here (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def data_parallel_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over the data-parallel (and context-parallel) replicas, e.g. of logged losses."""
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group(with_context_parallel=True)
    n = dist.get_world_size(group)
    if n == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, group=group)
    return out / n


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """In place: the elementwise maximum over every rank (flags all ranks must agree on:
    preemption, time limits, faults). A no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and values.device.type == "cpu":  # nccl: CUDA only
            on_device = values.cuda()
            dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
            values.copy_(on_device)
        else:
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def broadcast_object(obj):
    """Rank 0's ``obj`` (picklable) on every rank; the object itself in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def global_rank() -> int:
    """This process's rank in the world (0 in a single process)."""
    return dist.get_rank() if dist.is_initialized() else 0


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """In place: the elementwise sum over every rank (evaluation counters that each rank
    fills for its own tokens). A no-op in a single process."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and values.device.type == "cpu":
            on_device = values.cuda()
            dist.all_reduce(on_device)
            values.copy_(on_device)
        else:
            dist.all_reduce(values)
    return values


def stage_lead() -> tuple[bool, int]:
    """(whether this rank is its pipeline stage's first rank: TP, CP and DP rank 0; its
    pipeline rank). In a run without stages the lead is rank 0."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return global_rank() == 0, 0
    lead = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)
    return lead, ps.get_pipeline_model_parallel_rank()


def gather_to_main(obj) -> list | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0 (None elsewhere); ``[obj]``
    in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn):
    """Run ``fn()`` on rank 0 only and hand every rank its result (picklable). A
    ``UserError`` there is raised on every rank with the same message (rank 0's command
    prints it, the others stay silent), so no rank waits in a collective for a rank that
    refused; any other exception is rank 0's traceback, and the others stop with a line
    pointing at it."""
    from plait.errors import UserError

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    if dist.get_rank() == 0:
        try:
            value = fn()
        except UserError as e:
            broadcast_object(("user", type(e).__name__, str(e)))
            raise
        except BaseException as e:
            broadcast_object(("bug", type(e).__name__, str(e)))
            raise
        broadcast_object(("ok", "", value))
        return value
    kind, name, value = broadcast_object(None)
    if kind == "user":
        raise UserError(value)
    if kind == "bug":
        raise RuntimeError(f"rank 0 failed ({name}: {value}); see its traceback")
    return value
