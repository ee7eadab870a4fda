"""Autograd-aware collectives for the sequence-parallel schemes.

``all_gather(x, group)``: forward gathers every rank's tensor (stacked on a new dim 0);
backward hands each rank the *sum* of the gradients that all ranks computed for its tensor
(each rank's use of a gathered tensor is a distinct use, so summing is exact; nothing is
averaged or multiplied by the group size). On NCCL the backward is one reduce-scatter; gloo
has none, so there it is an all-reduce of the stacked gradients followed by taking this
rank's slice (same result, W times the bytes; CPU runs only).

``CommCounter`` records the bytes each collective moves, for benchmarks/sequence_parallel.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes sent per collective kind while active (payload sizes, not wire protocol)."""

    active: CommCounter | None = None

    def __init__(self):
        self.bytes: dict[str, int] = {}

    def add(self, kind: str, n: int) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + n

    @contextlib.contextmanager
    def record(self):
        prev, CommCounter.active = CommCounter.active, self
        try:
            yield self
        finally:
            CommCounter.active = prev


def _count(kind: str, t: torch.Tensor, factor: float = 1.0) -> None:
    if CommCounter.active is not None:
        CommCounter.active.add(kind, int(t.numel() * t.element_size() * factor))


def _reduce_to_owner(grad: torch.Tensor, group) -> torch.Tensor:
    """Backward of an all-gather: this rank's slice of the sum over ranks of ``grad``."""
    grad = grad.contiguous()
    W = dist.get_world_size(group)
    if dist.get_backend(group) == dist.Backend.NCCL:
        out = grad.new_empty(grad[0].numel())
        dist.reduce_scatter_tensor(out, grad.view(-1), group=group)
        _count("reduce_scatter", out, W - 1)
        return out.view(grad.shape[1:])
    summed = grad.clone()
    dist.all_reduce(summed, group=group)
    _count("reduce_scatter", grad[0], W - 1)  # count what a reduce-scatter would move
    return summed[dist.get_rank(group)]


class AsyncGather:
    """An all-gather started now and attached to autograd later, so that work placed between
    ``start`` and ``result`` overlaps the communication (LASP-2's local part)."""

    def __init__(self, x: torch.Tensor, group):
        self.x, self.group = x, group
        W = dist.get_world_size(group)
        self.buf = x.new_empty(W * x.numel())
        self.work = dist.all_gather_into_tensor(
            self.buf, x.detach().contiguous().view(-1), group=group, async_op=True
        )
        _count("all_gather", x, W - 1)

    def result(self) -> torch.Tensor:
        self.work.wait()
        W = dist.get_world_size(self.group)
        return _Attach.apply(self.x, self.buf.view(W, *self.x.shape), self.group)


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gathered, group):
        ctx.group = group
        return gathered.clone()

    @staticmethod
    def backward(ctx, grad):
        return _reduce_to_owner(grad, ctx.group), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        W = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty(W * x.numel())
        dist.all_gather_into_tensor(out, x.view(-1), group=group)
        _count("all_gather", x, W - 1)
        return out.view(W, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_to_owner(grad, ctx.group), None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[*] -> [W, *], differentiable (see module docstring)."""
    if group is None or dist.get_world_size(group) == 1:
        return x[None]
    return _AllGather.apply(x, group)


def all_gather_nograd(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x[None]
    W = dist.get_world_size(group)
    out = x.new_empty(W * x.numel())
    dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
    return out.view(W, *x.shape)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        _count("all_reduce", x)
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ``group``, all-reduced forward *and* backward.

    For a quantity summed from every rank's part and then used by every rank: rank r's part
    influences all ranks' uses, so its gradient is the sum of the gradients arriving on all
    ranks. (megatron's ``reduce_from_tensor_model_parallel_region`` has an identity backward,
    right only when what follows is replicated work whose gradient is already complete.)
    """
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)
