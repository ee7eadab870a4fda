"""How tensor parallelism splits each parameter, written down per family.

The split itself is done by the layers (megatron's column/row-parallel bricks, or
``mark_tp_sharded`` for tensors a layer splits itself); a plan states it as data so that
checkpoint resharding and the HF export can rely on it (each letter's plan is part of
its family entry, ``Letter.tp_plan``), and a test checks that every
parameter of every family is covered and that the built layers agree with their plan.
  column: split along dim 0 (output features, heads, channels) -- each rank its own rows;
  row: split along dim 1 (input features), the output all-reduced;
  replicated: every rank holds the whole tensor (norms, routers, row-parallel biases...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import family

if TYPE_CHECKING:
    from torch import nn

    from .config import ModelConfig


@dataclass(frozen=True)
class Split:
    kind: Literal["column", "row", "replicated"]
    why: str = ""

    @property
    def partition_dim(self) -> int | None:
        return {"column": 0, "row": 1, "replicated": None}[self.kind]


COLUMN, ROW, REPLICATED = Split("column"), Split("row"), Split("replicated")

COMMON: dict[str, Split] = {
    "embedding.weight": Split("column", "vocab-parallel: each rank a slice of the vocabulary"),
    "output.weight": Split("column", "vocab-parallel logits, never gathered (parallel CE)"),
    **{
        f"{n}.{k}": REPLICATED
        for n in ("final_norm", "mixer_norm", "mlp_norm")
        for k in ("weight", "bias")
    },
    "mlp.w1.weight": COLUMN,
    "mlp.w1.bias": COLUMN,
    "mlp.w2.weight": Split("column", "gated MLPs; in the GELU MLP w2 is the row-parallel fc2"),
    "mlp.w2.bias": Split("replicated", "fc2's bias is added after the all-reduce"),
    "mlp.w3.weight": ROW,
}
"""Block-level names (``blocks.{i}.`` stripped); ``mlp.w2.weight`` is row-split for GELU."""

ATTENTION: dict[str, Split] = {
    "proj.in_proj.weight": Split("column", "rows [head, role, dim]: whole heads per rank"),
    "proj.in_proj.bias": COLUMN,
    "proj.out_proj.weight": ROW,
    "proj.out_proj.bias": Split("replicated", "added after the all-reduce"),
}


def planned_split(name: str, cfg: ModelConfig) -> Split:
    """The plan's split for a parameter of the model (``HybridLM.named_parameters`` name)."""
    if not name.startswith("blocks."):
        return COMMON[name]
    _, i, rest = name.split(".", 2)
    if rest.startswith("mixer."):
        return family.letter(cfg.pattern[int(i)]).tp_plan[rest[len("mixer.") :]]
    if cfg.mlp == "gelu" and rest == "mlp.w2.weight":
        return ROW
    return COMMON[rest]


def check_plan(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """Parameters whose split disagrees with (or is missing from) the plan."""
    bad = []
    for name, p in model.named_parameters():
        try:
            split = planned_split(name, cfg)
        except KeyError:
            bad.append(f"{name}: not in the plan")
            continue
        sharded = bool(getattr(p, "tensor_model_parallel", False))
        dim = p.partition_dim if sharded else None
        if dim != split.partition_dim:
            bad.append(f"{name}: plan says {split.kind}, layer splits dim {dim}")
    return bad
