"""The DeepSpeed engine: ZeRO stage, optimizer, LR schedule, clipping, precision.

DeepSpeed owns gradient averaging over data-parallel ranks, ZeRO partitioning, gradient
accumulation, clipping and bf16 master weights. plait hands it a client optimizer (LAMB or
AdamW; one parameter group per set of hyperparameters, one per tensor at ZeRO-3: see
parallel/lamb.py) and a warmup + cosine LambdaLR, and an ``mpu`` over
megatron-core's groups so that it reduces over the right ranks.

On CPU: DeepSpeed JIT-compiles C++ ops on first use (a shared-memory comm op at
init_distributed takes ~3 minutes to build; CPU FusedAdam ~8). Neither is needed: the comm
op is marked incompatible before DeepSpeed initialises its communication backend, and the
optimizer is always a client optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from plait.parallel.engine_state import (
    clear_zero3_padding,
    client_optimizer,
    zero_partition_segments,
)
from plait.parallel.finite import GuardedAdamW, GuardedLamb
from plait.parallel.lamb import Lamb, param_groups
from plait.parallel.mpu import MegatronMpu
from plait.parallel.runtime import Runtime

from .config import Config, OptimizerConfig


def lr_multiplier(opt: OptimizerConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine to min_lr / lr at ``decay_steps`` (default: the run's
    length), flat after. ``step`` counts optimizer steps already taken."""
    decay = opt.decay_steps or total_steps
    floor = opt.min_lr / opt.lr

    def f(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if step >= decay:
            return floor
        progress = (step - opt.warmup_steps) / max(1, decay - opt.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def use_bf16(cfg: Config, rt: Runtime) -> bool:
    if cfg.training.precision == "auto":
        return rt.device.type == "cuda"
    return cfg.training.precision == "bf16"


def build_optimizer(model: nn.Module, cfg: Config, mpu: MegatronMpu) -> torch.optim.Optimizer:
    o = cfg.optimizer
    zero = cfg.parallel.zero_stage
    groups = param_groups(model, o.weight_decay, per_tensor=zero == 3)
    for g in groups:
        # The schedule (LambdaLR) multiplies this peak, so a capped tensor warms up and decays
        # with the rest, below its cap.
        g["lr"] = o.lr * g["lr_scale"]
        if g["lr_cap"] is not None:
            g["lr"] = min(g["lr"], g["lr_cap"])
    zero0 = zero == 0  # DeepSpeed skips non-finite steps only under ZeRO
    if o.name == "lamb":
        return (GuardedLamb if zero0 else Lamb)(
            groups,
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            weight_decay=o.weight_decay,
            min_trust=o.min_trust,
            max_trust=o.max_trust,
            partition_group=mpu.get_data_parallel_group() if zero else None,
            tensor_parallel_group=mpu.get_tensor_model_parallel_group(),
            flat_partitions=zero in (1, 2),
        )
    # foreach=False: the flat ZeRO partitions are single tensors; nothing to batch.
    return (GuardedAdamW if zero0 else torch.optim.AdamW)(
        groups,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        weight_decay=o.weight_decay,
        foreach=False,
    )


def deepspeed_config(cfg: Config, rt: Runtime) -> dict:
    t = cfg.training
    ds_dp = rt.dp * rt.cp  # DeepSpeed's data-parallel group includes context-parallel ranks
    bf16 = use_bf16(cfg, rt)
    if bf16 and cfg.parallel.zero_stage == 0:
        raise ValueError("training.precision: bf16 needs parallel.zero_stage >= 1 under DeepSpeed")
    # Under pipeline stages megatron's schedule runs the grad_accum micro-batches; the engine
    # sees one global batch per step (one reduction, one optimizer step).
    micro, accum = t.micro_batch_size, t.grad_accum
    if rt.pp > 1:
        micro, accum = micro * accum, 1
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * ds_dp,
        # ZeRO-0 under pipeline stages: clipped by plait.parallel.pipeline.clip_stage_grads
        "gradient_clipping": 0.0
        if rt.pp > 1 and not cfg.parallel.zero_stage
        else cfg.optimizer.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        # check_grad_overflow: a step with a non-finite gradient norm is skipped on every
        # rank and counted (skipped_steps), in bf16 as in fp32 (parallel/finite.py).
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def init_deepspeed_comm(rt: Runtime) -> None:
    import deepspeed

    if rt.device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=rt.backend, auto_mpi_discovery=False)


def build_engine(model: nn.Module, cfg: Config, rt: Runtime):
    """Wrap ``model`` in a DeepSpeed engine. Returns (engine, optimizer, scheduler)."""
    import deepspeed

    init_deepspeed_comm(rt)
    mpu = MegatronMpu()
    optimizer = build_optimizer(model, cfg, mpu)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(cfg.optimizer, cfg.training.steps)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model.to(rt.device),
        optimizer=optimizer,
        lr_scheduler=scheduler,
        mpu=mpu,
        config=deepspeed_config(cfg, rt),
    )
    # DeepSpeed 0.19.8 leaves the padding at the end of ZeRO-3 partitions uninitialised;
    # LAMB's per-tensor norms run over whole partitions, so it must be zero
    # (parallel/engine_state.py).
    clear_zero3_padding(engine)
    client = client_optimizer(engine)
    if isinstance(client, Lamb) and client.flat_partitions:
        client.link_partitions(zero_partition_segments(engine))
    return engine, optimizer, scheduler
