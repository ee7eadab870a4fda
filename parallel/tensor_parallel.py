"""Moving between full (logical) tensors and this rank's tensor-parallel shards.

megatron-core marks every TP-split parameter with ``tensor_model_parallel=True`` and its
``partition_dim``; every other parameter is replicated. Because each layer lays its fused
weights out so that a contiguous split hands a rank whole heads (see models/common), the
shard of a logical tensor is simply its ``tp_rank``-th chunk along ``partition_dim``. Used by
the tests (TP=n equals TP=1) and, later, by checkpoint resharding and HF export.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn


def _is_sharded(p: torch.Tensor) -> bool:
    return bool(getattr(p, "tensor_model_parallel", False))


def logical_numel(model: nn.Module) -> int:
    """Parameter count of the whole (unsharded) model, from one TP rank's shard."""
    tp = ps.get_tensor_model_parallel_world_size()
    return sum(p.numel() * (tp if _is_sharded(p) else 1) for p in model.parameters())


def full_shape(p: torch.Tensor) -> list[int]:
    """The logical (unsharded) shape of parameter ``p``: its TP shard's shape with the
    partition dim multiplied back (under ZeRO-3 the shard's shape is ``ds_shape``, the
    tensor itself being a partition)."""
    shape = list(getattr(p, "ds_shape", p.shape))
    if _is_sharded(p):
        shape[p.partition_dim] *= ps.get_tensor_model_parallel_world_size()
    return shape


def tp_full(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The full logical tensor of ``local``, a tensor shaped like parameter ``p`` on this rank
    (the parameter itself, its gradient, an optimizer moment): all-gathered over the TP group
    along ``p``'s partition dim; ``local`` itself when ``p`` is replicated."""
    tp = ps.get_tensor_model_parallel_world_size()
    if not _is_sharded(p) or tp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=p.partition_dim)


def tp_local(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This TP rank's slice of a full logical tensor for parameter ``p`` (the inverse of
    ``tp_full``; no collective)."""
    if not _is_sharded(p):
        return full
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return full.chunk(tp, dim=p.partition_dim)[rank]


@torch.no_grad()
def load_full_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full logical tensors into this rank's (possibly sharded) parameters."""
    for name, p in model.named_parameters():
        if name not in full:
            raise KeyError(f"load_full_state: no tensor named {name!r} in the given state")
        src = tp_local(p, full[name])
        if src.shape != p.shape:
            raise ValueError(
                f"load_full_state: {name!r} has shape {tuple(src.shape)} for this rank, "
                f"parameter is {tuple(p.shape)}"
            )
        p.copy_(src)


@torch.no_grad()
def gather_full(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Full logical tensors (parameters, or their ``.grad`` if ``grads``) on every TP rank."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.data
        if t is not None:
            out[name] = tp_full(p, t).detach().clone()
    return out


def gather_vocab_logits(logits_local: torch.Tensor) -> torch.Tensor:
    """Concatenate the vocab-parallel logits shards [..., V/tp] into [..., V]."""
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits_local
    parts = [torch.empty_like(logits_local) for _ in range(tp)]
    dist.all_gather(parts, logits_local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def sum_over_tp(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over the tensor-parallel ranks (identity at TP=1), with an
    all-reduce backward: e.g. a full-width norm's mean of squares, which every rank's shard
    then uses (see ``collectives.all_reduce_sum``)."""
    from .collectives import all_reduce_sum

    return all_reduce_sum(x, ps.get_tensor_model_parallel_group())


def shared_over_tp(w: torch.Tensor) -> torch.Tensor:
    """A replicated parameter that each TP rank applies to its own heads only (a per-head
    norm's weight shared by the heads): identity forward, gradient summed over the TP ranks
    backward (megatron-core's ``copy_to_tensor_model_parallel_region``), so every rank holds
    the whole gradient the single process computes. Identity at TP=1."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return w
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(w)


def mark_tp_sharded(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Mark a parameter that a layer splits itself (a depthwise conv over its channels, per-head
    scales) as TP-sharded along ``dim``, the way megatron marks its own layers' weights, so
    that LAMB, the checkpoint resharding and the HF export see it as one logical tensor."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(p, True, dim, 1)
    return p


def tp_rank_and_size() -> tuple[int, int]:
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
