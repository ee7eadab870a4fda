"""A DeepSpeed engine's training state as logical tensors, and back: what the checkpoints
(launcher/checkpoint.py) save and load under any layout.

Each parameter's full fp32 master weight and optimizer moments (``exp_avg``, ``exp_avg_sq``:
LAMB's and AdamW's) are gathered over the ZeRO partitions (every rank holds a disjoint
fragment of the flat fp32 partition; an all-reduce of zero-padded fragments over the
partition group assembles the TP-local tensor) and over tensor parallelism (all-gather along
megatron's ``partition_dim``). Loading does the reverse with no collective but ZeRO's own
``update_lp_params``: each rank slices its TP shard and copies its fragment into the flat
partition and the moments.

DeepSpeed internals read here (ZeRO-1/2, DeepSpeed 0.19; the checkpoint tests are the canary):
``bit16_groups``, ``single_partition_of_fp32_groups``, ``real_dp_process_group``, each
parameter's ``_hp_mapping`` (``lp_fragment_address``, ``hp_fragment_address``), the client
optimizer's ``state``, ``update_lp_params`` and ``_hp_optimizer_states_linked`` /
``_lazy_init_hp_params_optimizer_state`` -- the ones DeepSpeed's universal-checkpoint loader
uses. Its public ``safe_get_full_optimizer_state`` is not used: in 0.19.8 it fails for every
parameter group but the first when groups hold one tensor each (the links are made after
group 0's first step, before the other groups' state exists), and it cannot set state before
the first step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .tensor_parallel import tp_full, tp_local

MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_optimizer(engine):
    """The ZeRO-1/2 optimizer, or None at ZeRO-0 (DeepSpeed hands back the client one)."""
    o = engine.optimizer
    return o if hasattr(o, "single_partition_of_fp32_groups") else None


def client_optimizer(engine):
    z = zero_optimizer(engine)
    return z.optimizer if z is not None else engine.optimizer


def zero_partition_segments(engine) -> list[tuple[torch.Tensor, list[tuple[int, int, int]], int]]:
    """Per parameter group at ZeRO 1-2: (this rank's flat fp32 partition, [(start, numel,
    index of the tensor in the group)] of each tensor fragment the partition holds, number of
    tensors in the group); what ``Lamb.link_partitions`` takes. [] below ZeRO-1."""
    z = zero_optimizer(engine)
    if z is None:
        return []
    out = []
    for i, lps in enumerate(z.bit16_groups):
        fragments = []
        for j, lp in enumerate(lps):
            m = lp._hp_mapping
            if m is not None and m.hp_fragment_address.numel:
                fragments.append((m.hp_fragment_address.start, m.hp_fragment_address.numel, j))
        out.append((z.single_partition_of_fp32_groups[i], fragments, len(lps)))
    return out


def _group_of(z) -> dict[int, int]:
    return {id(lp): i for i, lps in enumerate(z.bit16_groups) for lp in lps}


@torch.no_grad()
def logical_state(engine) -> Iterator[tuple[str, dict[str, torch.Tensor], int]]:
    """Yield (name, {"": weight, "exp_avg": ..., "exp_avg_sq": ...}, optimizer step) per
    parameter, each full float32 on CPU, on every rank. Collective: all ranks iterate."""
    z = zero_optimizer(engine)
    groups = _group_of(z) if z is not None else {}
    client = client_optimizer(engine)
    for name, p in engine.module.named_parameters():
        local: dict[str, torch.Tensor] = {}
        if z is None:
            st = client.state.get(p, {})
            local[""] = p.detach().float()
            for k in MOMENTS:
                local[k] = st[k].float() if k in st else torch.zeros_like(local[""])
        else:
            i = groups[id(p)]
            flat = z.single_partition_of_fp32_groups[i]
            st = client.state.get(flat, {})
            m = p._hp_mapping
            for k, src in {"": flat, **{k: st.get(k) for k in MOMENTS}}.items():
                buf = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
                if m is not None and src is not None:
                    a, h = m.lp_fragment_address, m.hp_fragment_address
                    buf.narrow(0, a.start, a.numel).copy_(src.narrow(0, h.start, h.numel))
                dist.all_reduce(buf, group=z.real_dp_process_group[i])  # disjoint fragments
                local[k] = buf.view(p.shape)
        step: Any = st.get("step", 0)
        if torch.is_tensor(step):
            step = step.item()
        yield name, {k: tp_full(p, v).cpu() for k, v in local.items()}, int(step)


@torch.no_grad()
def load_logical_state(
    engine, get: Callable[[str, str], torch.Tensor], step: int
) -> torch.optim.Optimizer:
    """Fill this rank's weights and optimizer state from full logical tensors, whatever
    layout wrote them: ``get(name, key)`` returns the full tensor ("" for the weight, else a
    moment). ``step`` is the optimizer's step count (0: no state yet). Returns the client
    optimizer (its param groups' learning rates are the caller's to set)."""
    z = zero_optimizer(engine)
    client = client_optimizer(engine)

    def local(name, p, k=""):
        return tp_local(p, get(name, k)).reshape(p.shape).to(torch.float32)

    def step_value():
        if isinstance(client, torch.optim.AdamW):
            return torch.tensor(float(step))  # AdamW increments its own tensor in place
        return step

    if z is None:
        for name, p in engine.module.named_parameters():
            p.data.copy_(local(name, p).to(p.dtype))
            if step:
                client.state[p] = {"step": step_value(),
                                   **{k: local(name, p, k).clone() for k in MOMENTS}}  # fmt: skip
        return client
    groups = _group_of(z)
    fresh: dict[int, dict] = {}
    for name, p in engine.module.named_parameters():
        i = groups[id(p)]
        flat = z.single_partition_of_fp32_groups[i]
        if i not in fresh:
            fresh[i] = {"step": step_value(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
        m = p._hp_mapping
        if m is None:  # this rank holds none of the tensor
            continue
        a, h = m.lp_fragment_address, m.hp_fragment_address
        for k, dst in (("", flat), *((k, fresh[i][k]) for k in MOMENTS)):
            src = local(name, p, k).flatten().narrow(0, a.start, a.numel)
            dst.narrow(0, h.start, h.numel).copy_(src)
    if step:
        for i, st in fresh.items():
            client.state[z.single_partition_of_fp32_groups[i]] = st
        z._hp_optimizer_states_linked = False
        z._lazy_init_hp_params_optimizer_state()
    z.update_lp_params()  # fp32 masters -> the model's parameters (DP all-gather)
    return client
