"""A family defined outside plait, to show the registry is open: importing this module
registers it (``register``), and a run config names it (``model.families``).

Letter ``X``, a gated token shift: out = W_o(silu(conv_K(W_a x)) * W_b x) with a causal
depthwise convolution of ``toy.kernel`` taps, i.e. BaseConv without its biases. It reuses
plait.parallel's short-convolution operator (halo exchange under sequence parallelism) and
declares one auxiliary output: the mean squared gate activation, added to the loss times
``toy.penalty`` (so the aux-loss interface is exercised by a family plait does not know).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    reduce_from_tensor_model_parallel_region,
)
from torch import nn

from plait.models.common import (
    Auxiliary,
    Family,
    Letter,
    LetterDoc,
    ModelConfig,
    ModelConfigError,
    register,
)
from plait.models.common.hf_export import rename
from plait.models.common.layers import normal_init, output_init
from plait.models.common.presets import Preset
from plait.models.common.tp_plan import COLUMN, ROW, Split
from plait.parallel import convs
from plait.parallel.tensor_parallel import mark_tp_sharded, tp_rank_and_size


@dataclass
class ToyOptions:
    kernel: int = 2
    """Taps of the causal depthwise convolution."""
    penalty: float = 1e-3
    """Weight of the gate's mean square in the training loss."""

    def validate(self) -> None:
        if self.kernel < 1 or self.penalty < 0:
            raise ModelConfigError(f"toy: kernel must be >= 1 and penalty >= 0, got {self}")


class TokenShift(nn.Module):
    def __init__(self, cfg, mp, layer_idx, sp):
        super().__init__()
        h, K = cfg.hidden_size, cfg.toy.kernel
        col = dict(config=mp, bias=False, gather_output=False, init_method=normal_init(0.02))
        self.w_a = ColumnParallelLinear(h, h, **col)
        self.w_b = ColumnParallelLinear(h, h, **col)
        self.w_o = RowParallelLinear(
            h, h, config=mp, bias=False, input_is_parallel=True, skip_bias_add=False,
            init_method=output_init(cfg),
        )
        rank, tp = tp_rank_and_size()
        c = h // tp
        w = torch.randn(h, K) / K  # drawn whole, then this rank's channels
        self.taps = mark_tp_sharded(nn.Parameter(w[rank * c : (rank + 1) * c].clone()), 0)
        self.sp, self.penalty, self.width = sp, cfg.toy.penalty, h
        self.gate_sq: torch.Tensor | None = None

    @staticmethod
    def param_count(cfg, layer_idx: int) -> int:
        return 3 * cfg.hidden_size**2 + cfg.hidden_size * cfg.toy.kernel

    @staticmethod
    def tp_split(cfg, layer_idx: int) -> dict[str, int]:
        return {"model.hidden_size": cfg.hidden_size}

    @staticmethod
    def halo(cfg, layer_idx: int) -> tuple[str, int]:
        return "model.toy.kernel", cfg.toy.kernel - 1

    def auxiliary(self) -> list[Auxiliary]:
        if self.gate_sq is None:
            return []
        return [Auxiliary("toy_gate_sq", self.gate_sq, self.penalty)]

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        a, _ = self.w_a(x_BTC)
        b, _ = self.w_b(x_BTC)
        a = F.silu(convs.short_conv(self.sp, a, self.taps.to(a.dtype), None, doc_ids_BT))
        # The mean over all channels, not this TP rank's: megatron's reduce (all-reduce forward,
        # identity backward: each rank's channels get their own gradient once).
        local = (b.float() ** 2).sum(-1)
        self.gate_sq = reduce_from_tensor_model_parallel_region(local).mean() / self.width
        out, _ = self.w_o(a * b)
        return out

    def decode(self, x_BTC, positions_BT, state):
        """The mixer contract's decode form: T more tokens from ``state`` (``conv``: the last
        kernel - 1 inputs of the convolved half; None at the start)."""
        a, _ = self.w_a(x_BTC)
        b, _ = self.w_b(x_BTC)
        K = self.taps.shape[1]
        tail = state["conv"] if state is not None else a.new_zeros(a.shape[0], K - 1, a.shape[2])
        u = torch.cat((tail, a), 1)
        w = self.taps[:, None, :].to(u.dtype)
        y = F.conv1d(u.transpose(1, 2), w, groups=u.shape[2]).transpose(1, 2)
        out, _ = self.w_o(F.silu(y) * b)
        return out, {"conv": u[:, u.shape[1] - (K - 1) :].clone()}


X = Letter(
    symbol="X",
    mixer=TokenShift,
    tp_plan={
        "w_a.weight": COLUMN,
        "w_b.weight": COLUMN,
        "w_o.weight": ROW,
        "taps": Split("column", "depthwise: channel c's taps with channel c"),
    },
    hf_export=rename(
        {
            "w_a.weight": "a_proj.weight",
            "w_b.weight": "b_proj.weight",
            "w_o.weight": "o_proj.weight",
            "taps": "conv.weight",
        },
        hf_class="TokenShift",  # in toy_family_hf.py, the family's HF-side module
    ),
    mixing_flops=lambda cfg, i, T: cfg.hidden_size * (2 * cfg.toy.kernel + 3),
    doc=LetterDoc(
        description="toy gated token shift (tests/models/toy_family.py)",
        sequence_parallel="halo exchange of the last kernel - 1 inputs",
        decode_state="the last kernel - 1 inputs of the convolved half",
    ),
)


def _tiny():
    return ModelConfig(pattern="XAXA", num_layers=4, hidden_size=32, num_heads=4,
                       ffn_hidden_size=64, options={"toy": ToyOptions(kernel=3)})


FAMILY = register(
    Family(
        name="toy",
        description="a family registered from the tests folder",
        letters=(X,),
        options=ToyOptions,
        presets={"toy-tiny": Preset(_tiny, None, "registry test")},
        hf_code=Path(__file__).with_name("toy_family_hf.py"),
    )
)
