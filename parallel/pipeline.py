"""Pipeline stages at run time: the wiring that runs the chunks parallel/stages.py plans
(the cut itself, ``balance``, ``stage_layers``, ``Stage``, ``local_stages``, is pure
arithmetic and lives there).

The wiring (``StageChunk``, ``StageContainer``, ``PipelineRunner``) lets megatron-core's
schedules (``get_forward_backward_func``: 1F1B, interleaved 1F1B with virtual stages) drive
micro-batches through a model's stages while a DeepSpeed engine keeps what it owns: the
data-parallel reduction, ZeRO partitioning, clipping and the optimizer step, once per global
batch after the schedule. Why this split: DeepSpeed's own PipelineEngine supports ZeRO-1 only
and wants its own layer list; megatron's DistributedOptimizer and gradient clipping assume
CUDA (docs/parallelism.md). What the wiring takes care of:
  * activations cross stages in megatron's [sequence, batch, hidden] layout (the p2p buffers
    are allocated from that shape); plait's layers keep [batch, sequence, hidden];
  * tied embeddings: the first and the last stage hold the same logical tensor
    (``embedding.weight``); its gradient is all-reduced over megatron's embedding group
    before the engine reduces over data-parallel ranks, as megatron does;
  * auxiliary losses of stages without the loss (MoH's balance loss) reach the backward pass
    through ``attach_aux_loss`` (megatron's MoEAuxLossAutoScaler idea): the stage's output
    carries them, and the backward feeds them the gradient the schedule's loss scale gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .stages import Stage

# ----------------------------------------------------------------------------- auxiliary losses


class _AuxLossAttach(torch.autograd.Function):
    """Identity on the activation; its backward gives the attached auxiliary loss the gradient
    ``scale`` (the factor the schedule applies to the main loss: 1 / micro-batches)."""

    scale = 1.0

    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, _AuxLossAttach.scale)


def attach_aux_loss(x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``x``, carrying ``aux`` (a scalar loss computed on a stage without the LM loss) into the
    backward pass: d(total)/d(aux) is the schedule's loss scale, exactly as if ``aux`` had been
    added to the loss on the last stage."""
    return _AuxLossAttach.apply(x, aux)


def set_aux_loss_scale(scale: float) -> None:
    _AuxLossAttach.scale = scale


# ----------------------------------------------------------------------------- stage modules


class StageChunk(nn.Module):
    """A model chunk as megatron's schedules see it: ``config`` (a TransformerConfig),
    ``model_type``, ``set_input_tensor`` and the [sequence, batch, hidden] layout on the wire.
    ``forward(*args, **kwargs)`` calls the wrapped stage with ``hidden_BTC=`` the received
    activation (none on the first stage) and returns its output transposed for sending (or,
    on the last stage, what the stage returns: the loss or the logits)."""

    def __init__(self, module: nn.Module, stage: Stage, config, vp_stage: int):
        super().__init__()
        from megatron.core.enums import ModelType

        self.module = module
        self.stage = stage
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.vp_stage = vp_stage
        self._input: torch.Tensor | None = None

    def set_input_tensor(self, tensors) -> None:
        t = tensors[0] if isinstance(tensors, list | tuple) else tensors
        self._input = t

    def forward(self, *args, **kwargs):
        if not self.stage.first:
            kwargs["hidden_BTC"] = self._input.transpose(0, 1).contiguous()
        out = self.module(*args, **kwargs)
        if self.stage.last:
            return out
        return out.transpose(0, 1).contiguous()


class StageContainer(nn.Module):
    """This rank's chunks as one module for DeepSpeed, with the whole model's parameter names:
    the chunks' submodules are registered here directly (blocks merged under ``blocks`` by
    their global index), so ``named_parameters`` gives ``blocks.7.mixer...`` as a single
    process would, and checkpoints, LAMB's groups and the logs see logical names."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self._stages = list(stages)  # plain list: not registered twice
        blocks = nn.ModuleList()
        for s in self._stages:
            for name, child in s.named_children():
                if name == "blocks":
                    for key, block in child._modules.items():
                        blocks._modules[key] = block
                elif name not in self._modules:
                    self.add_module(name, child)
        self.add_module("blocks", blocks)

    @property
    def stages(self) -> list[nn.Module]:
        return self._stages

    def train(self, mode: bool = True):
        super().train(mode)
        for s in self._stages:
            s.train(mode)
        return self

    @property
    def metrics(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for s in self._stages:
            for k, v in getattr(s, "metrics", {}).items():
                out[k] = out[k] + v if k in out else v
        return out

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline stage runs through PipelineRunner, not engine(...)")


def mark_shared_embedding(weight: nn.Parameter, replica: bool) -> None:
    """Mark a tied embedding weight held by the first and the last stage: its gradient is
    all-reduced over the embedding group (``finalize_grads``); the last stage's copy is a
    replica for gradient clipping (DeepSpeed counts it once)."""
    weight.shared_embedding = True
    if replica:
        weight.ds_pipe_replicated = True


@contextlib.contextmanager
def shared_init_rng():
    """Build every stage from the RNG state of the first stage (broadcast over the pipeline
    group), so that each layer gets the weights it has in a single process whatever stage
    builds it; the rank's own stream is restored afterwards."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    own = torch.get_rng_state()
    state = own.clone()
    if dist.get_world_size(group) > 1:
        dist.broadcast(state, src=dist.get_global_rank(group, 0), group=group)
    torch.set_rng_state(state)
    try:
        yield
    finally:
        torch.set_rng_state(own)


# ----------------------------------------------------------------------------- the schedule


def transformer_config(hidden_size: int, num_layers: int, tp: int, pp: int, cp: int,
                       virtual: int, finalize: Callable | None):
    """The TransformerConfig megatron's schedules read from each chunk (``.config``): only the
    pipeline fields matter; the rest describes no real layer. ``batch_p2p_comm`` is off for
    interleaving: at PP=2 the previous and the next peer are the same rank and gloo delivers
    the batched messages out of order (measured: silently wrong gradients)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=max(num_layers, pp * virtual),
        hidden_size=hidden_size,
        num_attention_heads=tp,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=virtual if virtual > 1 else None,
        context_parallel_size=cp,
        pipeline_dtype=torch.float32,
        use_cpu_initialization=True,
        batch_p2p_comm=virtual == 1,
        finalize_model_grads_func=finalize,
    )


def finalize_grads(chunks: list[nn.Module]) -> None:
    """After the schedule's last backward: sum the tied embedding's gradient over the first and
    the last stage (megatron's embedding group), so both copies take the same step."""
    from megatron.core import parallel_state as ps

    group = ps.get_embedding_group(check_initialized=False)
    if group is None or dist.get_world_size(group) == 1:
        return
    if dist.get_rank() not in dist.get_process_group_ranks(group):
        return
    for chunk in chunks:
        for p in chunk.parameters():
            if getattr(p, "shared_embedding", False) and p.grad is not None:
                dist.all_reduce(p.grad, group=group)


def stage_grad_norms(engine) -> None:
    """Make a ZeRO-1/2 engine's global gradient norm (clipping, logs) span the pipeline stages.

    DeepSpeed 0.19's ZeRO optimizer reduces each parameter group's norm over its "model
    parallel" group, one all-reduce per group; stages hold different tensors, hence different
    parameter groups, so over the TP x PP group those collectives would not pair up (a hang,
    measured). Here each group's norm is reduced over TP only (as without stages) and the
    stage's combined norm once over the pipeline group (a non-finite norm stays non-finite).
    Reads ``scaled_global_norm`` and ``model_parallel_group`` (DeepSpeed internals; the
    PP x DP ZeRO-1 parity test is the canary)."""
    from megatron.core import parallel_state as ps

    z = engine.optimizer
    if not hasattr(z, "scaled_global_norm") or not hasattr(z, "model_parallel_group"):
        return
    original = z.scaled_global_norm
    tp_group, pp_group = (
        ps.get_tensor_model_parallel_group(),
        ps.get_pipeline_model_parallel_group(),
    )

    def scaled_global_norm(norm_type=2):
        full, z.model_parallel_group = z.model_parallel_group, tp_group
        try:
            norm = original(norm_type)
        finally:
            z.model_parallel_group = full
        sq = norm.double() ** 2
        dist.all_reduce(sq, group=pp_group)
        return sq.sqrt().to(norm.dtype)

    z.scaled_global_norm = scaled_global_norm


@torch.no_grad()
def clip_stage_grads(chunks: list[nn.Module], max_norm: float) -> float:
    """Gradient clipping at ZeRO-0 under stages (DeepSpeed's is off there): DeepSpeed 0.19's
    ZeRO-0 clip counts the last stage's copy of a tied embedding again (it ignores
    ``ds_pipe_replicated``; measured 6e-3 off in the weights with AdamW). Same formula
    (coefficient max_norm / (norm + 1e-6), at most 1), each tensor counted once: TP-sharded
    ones on every TP rank, replicated ones on TP rank 0, summed over TP x PP. Returns the
    norm."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    grads, squares = [], []
    for chunk in chunks:
        for p in chunk.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            if getattr(p, "ds_pipe_replicated", False):
                continue
            if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
                squares.append(p.grad.detach().float().norm() ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    norm = total.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return float(norm)


class PipelineRunner:
    """Runs one global batch through this rank's chunks with megatron's schedule, inside the
    DeepSpeed engine's gradient reduction, then steps the engine once.

    ``forward(chunk, micro_batch)`` is the caller's: it calls ``chunk(...)`` with the micro
    batch's tensors and returns the chunk's output (the loss on the last stage, an activation
    elsewhere). ``hidden_size`` and the global sequence length fix the p2p buffers' shape."""

    def __init__(self, chunks: list[StageChunk], engine, hidden_size: int, zero_stage: int,
                 grad_clip: float = 0.0):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.chunks = chunks
        self.engine = engine
        self.hidden_size = hidden_size
        self.zero_stage = zero_stage
        self.pp = ps.get_pipeline_model_parallel_world_size()
        self.cp = ps.get_context_parallel_world_size()
        self.virtual = len(chunks)
        self.fb = get_forward_backward_func()
        self.is_last = ps.is_pipeline_last_stage(ignore_virtual=True)
        cfg = chunks[0].config

        def finalize(model, num_tokens=None, *args, **kwargs):
            finalize_grads(model)
            if self.zero_stage == 0 and self.engine is not None:
                self.engine.allreduce_gradients()
                if grad_clip > 0:
                    clip_stage_grads(model, grad_clip)

        cfg.finalize_model_grads_func = finalize
        if engine is not None:
            stage_grad_norms(engine)

    def _iterators(self, batches: list) -> list[Iterator] | Iterator:
        if self.virtual == 1:
            return iter(batches)
        return [iter(batches) for _ in range(self.virtual)]

    def run(self, batches: list[dict], forward: Callable, seq_len: int,
            forward_only: bool = False) -> list[dict]:
        """Run the micro-batches; returns, on the last stage, each micro-batch's dict of
        detached values the loss function reported (empty elsewhere)."""
        m = len(batches)
        rows = batches[0]["tokens"].shape[0]
        set_aux_loss_scale(1.0 / m)

        def step_func(data_iterator, model):
            b = next(data_iterator)
            out = forward(model, b)
            if not model.stage.last:
                return out, None
            return out, _loss_func

        kwargs = dict(
            forward_step_func=step_func,
            data_iterator=self._iterators(batches),
            model=self.chunks if self.virtual > 1 else self.chunks[0],
            num_microbatches=m,
            seq_length=seq_len,
            micro_batch_size=rows,
            forward_only=forward_only,
        )
        if forward_only or self.zero_stage == 0:
            return self.fb(**kwargs)
        with self.engine.coalesce_grad_reduction():
            return self.fb(**kwargs)

    def step(self) -> None:
        self.engine.step()


def _loss_func(out):
    """The last stage's loss reduction for megatron: (loss, 1 token, values to keep). Passing
    one "token" keeps megatron from scaling by the context-parallel size (plait's loss is
    already the mean over this rank's tokens; DeepSpeed averages over DP x CP ranks); the
    schedule then divides by the number of micro-batches, in place (hence the clone)."""
    if isinstance(out, dict):  # forward-only evaluation: the stage returned its values
        return torch.zeros(()), torch.tensor(1, dtype=torch.int), out
    return out, torch.tensor(1, dtype=torch.int), {"loss": out.detach().clone()}


def sum_over_pipeline(values: dict[str, float], names: list[str]) -> dict[str, float]:
    """Add up per-stage partial values (each stage's share of an auxiliary loss's layer mean)
    over the pipeline group, by name; every rank returns the totals."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    t = torch.tensor([float(values.get(n, 0.0)) for n in names], dtype=torch.float64)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return dict(zip(names, t.tolist()))


def names_over_pipeline(names: list[str]) -> list[str]:
    """The union of metric names the stages report (in sorted order, on every rank)."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return sorted(names)
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, sorted(names), group=group)
    return sorted({n for part in out for n in part})


def from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """``values`` of the last pipeline stage on every stage (in place; a broadcast over the
    pipeline group): the loss is known there only, and every rank logs and decides alike."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    n = dist.get_world_size(group)
    if n > 1:
        dist.broadcast(values, src=dist.get_global_rank(group, n - 1), group=group)
    return values
