"""Based's three token mixers.

* ``B`` -- linear attention with the 2nd-order Taylor feature map (feature dim 16 per head,
  153 features after removing symmetric duplicates), normalised output. Cheap recall over
  the whole context with a fixed-size state.
* ``W`` -- sliding-window softmax attention with rotary positions: exact recall of the last
  ``window`` tokens, which the Taylor map approximates poorly.
* ``C`` -- gated short convolution (the reference code's BaseConv): in projection split into
  a convolved half (depthwise causal conv, kernel 3, SiLU) and a gate half, multiplied,
  then out projection.
Heads (B, W) and channels (C) are split across TP ranks; sequence parallelism comes from the
``SequenceParallel`` context (LASP-2 states for B, halo exchange for W and C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from plait.models.common.config import ModelConfig, ModelConfigError
from plait.models.common.layers import (
    HeadProjections,
    normal_init,
    output_init,
)
from plait.models.common.mixers import SoftmaxAttention
from plait.parallel import convs, halo, lasp2
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import mark_tp_sharded, tp_rank_and_size


class BasedLinearAttention(nn.Module):
    """Letter ``B``: q, k projected to ``based.feature_dim`` per head, v to the head dim."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        f, d = cfg.based.feature_dim, cfg.head_dim
        self.proj = HeadProjections(cfg, mp, cfg.num_heads, (f, f, d), d)
        self.eps = cfg.based.eps
        self.block = cfg.lightning_block
        self.sp = sp

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        return 2 * cfg.hidden_size * cfg.num_heads * cfg.based.feature_dim + 2 * cfg.hidden_size**2

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        q, k, v = self.proj.split(x_BTC)
        o = lasp2.based(self.sp, q, k, v, doc_ids_BT, eps=self.eps, block=self.block)
        return self.proj.merge(o)


class SlidingWindowAttention(SoftmaxAttention):
    """Letter ``W``: softmax attention (RoPE, same projections) over the last ``based.window``
    tokens only."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__(cfg, mp, layer_idx, sp)
        self.window = cfg.based.window

    def attend(self, q, k, v, doc_ids_BT):
        return halo.window(self.sp, q, k, v, self.window, doc_ids_BT)


class GatedShortConv(nn.Module):
    """Letter ``C``: out(SiLU(conv(W_a x)) * W_b x), the reference BaseConv.

    Inner width ``conv_expand * hidden / 2`` per half; projections with biases, conv without
    (the published configs). W_a and W_b are two column-parallel layers (not one fused
    [W_a; W_b]) so that a TP rank holds matching channels of both halves; the depthwise conv
    weight [inner, K] is split over the same channels. It is drawn whole (PyTorch Conv1d's
    default uniform(+-1/sqrt(K))) and then sliced, so every TP size gets the same logical init.
    """

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        h, K = cfg.hidden_size, cfg.based.conv_kernel
        inner = cfg.based.conv_expand * h // 2
        common = dict(config=mp, bias=True, gather_output=False)
        self.in_conv = ColumnParallelLinear(
            h, inner, init_method=normal_init(cfg.init_std), **common
        )
        self.in_gate = ColumnParallelLinear(
            h, inner, init_method=normal_init(cfg.init_std), **common
        )
        self.out_proj = RowParallelLinear(
            inner, h, config=mp, bias=True, input_is_parallel=True, skip_bias_add=False,
            init_method=output_init(cfg),
        )  # fmt: skip
        rank, tp = tp_rank_and_size()
        if inner % tp:
            raise ModelConfigError(
                f"based.conv_expand: {inner} channels cannot be split over TP={tp}"
            )
        c = inner // tp
        bound = 1.0 / math.sqrt(K)
        w = torch.empty(inner, K).uniform_(-bound, bound)[rank * c : (rank + 1) * c]
        self.conv_weight = mark_tp_sharded(nn.Parameter(w.clone()), 0)
        self.sp = sp

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        h = cfg.hidden_size
        inner = cfg.based.conv_expand * h // 2
        return 2 * (h * inner + inner) + inner * h + h + inner * cfg.based.conv_kernel

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        a, _ = self.in_conv(x_BTC)
        b, _ = self.in_gate(x_BTC)
        a = F.silu(convs.short_conv(self.sp, a, self.conv_weight.to(a.dtype), None, doc_ids_BT))
        out, _ = self.out_proj(a * b)
        return out
