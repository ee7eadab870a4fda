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

from plait.kernels.based import based_attention
from plait.kernels.shortconv import short_conv as short_conv_kernel
from plait.kernels.swa import swa
from plait.models.common.config import ModelConfig, ModelConfigError
from plait.models.common.layers import (
    HeadProjections,
    apply_rotary,
    normal_init,
    output_init,
    rotary_cos_sin,
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

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.num_heads": cfg.num_heads}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        q, k, v = self.proj.split(x_BTC)
        o = lasp2.based(self.sp, q, k, v, doc_ids_BT, eps=self.eps, block=self.block)
        return self.proj.merge(o)

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (family.py's contract). ``state["kv"]`` [B, H_local, F, d + 1] (float32)
        is sum_j phi(k_j)^T [v_j, 1]: the numerator's state and, in the last column, the
        normaliser's. Both terms of every later output are linear in it, so it is all the past
        a query needs; the chunked kernel continues from it for any number of new tokens."""
        q, k, v = self.proj.split(x_BTC)
        initial = None if state is None else state["kv"]
        o, kv = based_attention(
            q, k, v, initial_state=initial, return_state=True, eps=self.eps, block=self.block
        )
        return self.proj.merge(o), {"kv": kv}


class SlidingWindowAttention(SoftmaxAttention):
    """Letter ``W``: softmax attention (RoPE, same projections) over the last ``based.window``
    tokens only."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__(cfg, mp, layer_idx, sp)
        self.window = cfg.based.window

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "model.based.window", cfg.based.window - 1

    def attend(self, q, k, v, doc_ids_BT):
        return halo.window(self.sp, q, k, v, self.window, doc_ids_BT)

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (family.py's contract). The state holds the rotated keys ``k`` and
        the values ``v`` [B, H_local, <= window - 1, d] of the last window - 1 tokens: no
        later query sees anything older. New queries run the window kernel over [cached, new]
        keys behind zero queries for the cached positions (as the halo exchange does)."""
        q, k, v = self.proj.split(x_BTC)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is None:
            o = self.attend(q, k, v, None)
        else:
            h = state["k"].shape[2]
            k, v = torch.cat((state["k"], k), 2), torch.cat((state["v"], v), 2)
            q = torch.cat((q.new_zeros(q.shape[:2] + (h, q.shape[3])), q), 2)
            o = swa(q, k, v, self.window)[:, :, h:]
        keep = max(k.shape[2] - (self.window - 1), 0)
        # clones: a slice would keep the whole projection output alive
        return self.proj.merge(o), {"k": k[:, :, keep:].clone(), "v": v[:, :, keep:].clone()}


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
        )
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

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.based.conv_expand: conv_expand x hidden_size / 2 channels":
                cfg.based.conv_expand * cfg.hidden_size // 2}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "model.based.conv_kernel", cfg.based.conv_kernel - 1

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        a, _ = self.in_conv(x_BTC)
        b, _ = self.in_gate(x_BTC)
        a = F.silu(convs.short_conv(self.sp, a, self.conv_weight.to(a.dtype), None, doc_ids_BT))
        out, _ = self.out_proj(a * b)
        return out

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (family.py's contract). ``state["conv"]`` [B, K - 1, inner_local]
        holds the last K - 1 inputs of the convolved half (zeros before the sequence start,
        as the causal conv pads): a kernel of K taps sees nothing older."""
        a, _ = self.in_conv(x_BTC)
        b, _ = self.in_gate(x_BTC)
        K = self.conv_weight.shape[1]
        prev = a.new_zeros(a.shape[0], K - 1, a.shape[2]) if state is None else state["conv"]
        a = torch.cat((prev, a), 1)
        conv = short_conv_kernel(a, self.conv_weight.to(a.dtype))[:, K - 1 :]
        out, _ = self.out_proj(F.silu(conv) * b)
        return out, {"conv": a[:, a.shape[1] - (K - 1) :].clone()}
