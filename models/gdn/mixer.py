"""Qwen3.5's two token mixers: Gated DeltaNet (letter ``G``) and its gated softmax attention
(letter ``Q``), computing what transformers' ``Qwen3_5GatedDeltaNet`` and
``Qwen3_5Attention`` compute (transformers 5.x, models/qwen3_5/modeling_qwen3_5.py).

G: x -> q, k, v projections -> one causal depthwise convolution over [q | k | v] (no bias)
-> SiLU -> q, k L2-normalised per head (float32) and repeated over the value heads each key
head serves -> the gated delta rule with beta = sigmoid(b x) and the log-decay
g = -exp(A_log) softplus(a x + dt_bias) -> per head RMSNorm(o) * weight * SiLU(z x) -> out.
Q: q_proj gives each head its query and an output gate; q and k get a per-head RMSNorm and
rotary positions on their first partial_rotary x head_dim dims; grouped-query attention;
the output is multiplied by sigmoid(gate) before o_proj.

Where plait's layout differs from the release's (same function): the release fuses q, k, v
into ``in_proj_qkv`` and one conv over all their channels; plait keeps three projections and
three conv weights so that a contiguous tensor-parallel split hands each rank whole heads of
each (models/gdn/qwen35.py re-fuses them). Qwen3.5's RMSNorms (blocks, final, q/k norms)
store weight - 1 ("zero-centred"); plait's store the weight itself, converted at import and
export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from plait.kernels.gated_delta import gated_delta_rule, gated_delta_step, l2_normalize
from plait.kernels.shortconv import short_conv as short_conv_kernel
from plait.models.common.config import ModelConfig
from plait.models.common.layers import (
    RMSNorm,
    apply_rotary,
    column_linear,
    local_heads,
    rotary_cos_sin,
    row_linear,
    wide,
)
from plait.models.common.mixers import GroupedQueryAttention
from plait.parallel import convs
from plait.parallel.gated_delta import gated_delta
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import mark_tp_sharded, shared_over_tp


class GatedRMSNorm(nn.Module):
    """RMSNorm(o) * weight * SiLU(gate) over each head's channels: the release's
    ``Qwen3_5RMSNormGated`` (normalised in float32, cast back before the weight, the gate's
    SiLU in float32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = shared_over_tp(self.weight).to(x.dtype) * y
        return (wide(y) * F.silu(wide(gate))).to(x.dtype)


class HeadRMSNorm(RMSNorm):
    """RMSNorm over each head's dims whose weight all heads share: each TP rank norms its
    own heads, so the weight's gradient is summed over the ranks (``shared_over_tp``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * shared_over_tp(self.weight).to(xf.dtype)).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Qwen3.5's Gated DeltaNet layer (letter ``G``), split by key heads over TP."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        o = cfg.gdn
        self.sp, self.block = sp, o.chunk
        self.hk, first_k = local_heads(o.key_heads, "gdn.key_heads")
        self.hv, first_v = local_heads(o.value_heads, "gdn.value_heads")
        self.dk, self.dv, self.kernel = o.key_dim, o.value_dim, o.conv_kernel
        self.q_proj = column_linear(cfg, mp, o.key_heads * o.key_dim)
        self.k_proj = column_linear(cfg, mp, o.key_heads * o.key_dim)
        self.v_proj = column_linear(cfg, mp, o.value_heads * o.value_dim)
        self.z_proj = column_linear(cfg, mp, o.value_heads * o.value_dim)
        self.b_proj = column_linear(cfg, mp, o.value_heads)
        self.a_proj = column_linear(cfg, mp, o.value_heads)
        self.out_proj = row_linear(cfg, mp, o.value_heads * o.value_dim)
        # nn.Conv1d's default init (the release's): uniform within 1 / sqrt(fan_in = taps).
        bound = 1.0 / math.sqrt(o.conv_kernel)
        for name, heads, dim, first, local in (
            ("q_conv", o.key_heads, o.key_dim, first_k, self.hk),
            ("k_conv", o.key_heads, o.key_dim, first_k, self.hk),
            ("v_conv", o.value_heads, o.value_dim, first_v, self.hv),
        ):
            w = torch.empty(heads * dim, o.conv_kernel).uniform_(-bound, bound)
            w = w[first * dim : (first + local) * dim].clone()
            setattr(self, name, mark_tp_sharded(nn.Parameter(w), 0))
        # The release's init: A uniform in [0.01, 16] (log kept), dt_bias ones.
        A = torch.empty(o.value_heads).uniform_(0.01, o.a_init_max)[first_v : first_v + self.hv]
        self.A_log = mark_tp_sharded(nn.Parameter(A.log()), 0)
        self.dt_bias = mark_tp_sharded(nn.Parameter(torch.ones(self.hv)), 0)
        self.norm = GatedRMSNorm(o.value_dim, cfg.norm_eps)

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        o, h = cfg.gdn, cfg.hidden_size
        qk, vv = o.key_heads * o.key_dim, o.value_heads * o.value_dim
        projections = h * (2 * qk + 2 * vv + 2 * o.value_heads) + vv * h
        return projections + (2 * qk + vv) * o.conv_kernel + 2 * o.value_heads + o.value_dim

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.gdn.key_heads": cfg.gdn.key_heads,
                "model.gdn.value_heads": cfg.gdn.value_heads}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "model.gdn.conv_kernel", cfg.gdn.conv_kernel - 1

    def _project(self, x_BTC):
        """(the convolution's input [B, T, q|k|v channels], z, b, a) of this rank's heads."""
        parts = [p(x_BTC)[0] for p in (self.q_proj, self.k_proj, self.v_proj)]
        z, b, a = (p(x_BTC)[0] for p in (self.z_proj, self.b_proj, self.a_proj))
        return torch.cat(parts, -1), z, b, a

    def _conv_weight(self, dtype):
        return torch.cat([self.q_conv, self.k_conv, self.v_conv], 0).to(dtype)

    def _rule_inputs(self, mixed_BTC, b, a):
        """q, k [B, Hv, T, Dk] (L2-normalised, repeated over value heads), v [B, Hv, T, Dv],
        g and beta [B, Hv, T]."""
        B, T, _ = mixed_BTC.shape
        qk = self.hk * self.dk
        q, k, v = mixed_BTC.split([qk, qk, self.hv * self.dv], -1)
        rep = self.hv // self.hk
        q, k = (
            l2_normalize(t.reshape(B, T, self.hk, self.dk)).to(t.dtype)
            .repeat_interleave(rep, 2).transpose(1, 2)
            for t in (q, k)
        )
        v = v.reshape(B, T, self.hv, self.dv).transpose(1, 2)
        beta = b.sigmoid().transpose(1, 2)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return q, k, v, g.transpose(1, 2), beta

    def _out(self, o_BHTV, z_BTV):
        B, H, T, V = o_BHTV.shape
        o = self.norm(o_BHTV.transpose(1, 2), z_BTV.reshape(B, T, H, V))
        out, _ = self.out_proj(o.reshape(B, T, H * V))
        return out

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        mixed, z, b, a = self._project(x_BTC)
        w = self._conv_weight(mixed.dtype)
        mixed = F.silu(convs.short_conv(self.sp, mixed, w, None, doc_ids_BT))
        q, k, v, g, beta = self._rule_inputs(mixed, b, a)
        o = gated_delta(self.sp, q, k, v, g, beta, doc_ids_BT, block=self.block)
        return self._out(o, z)

    def decode(self, x_BTC, positions_BT, state):
        """Decode form (family.py's contract). ``state["conv"]`` [B, K - 1, channels] holds
        the last K - 1 inputs of the convolution (zeros before the start, as its padding),
        ``state["S"]`` [B, Hv_local, Dk, Dv] the delta rule's state in float32: a token needs
        nothing older, since its conv window is K taps and every output reads only S."""
        mixed, z, b, a = self._project(x_BTC)
        K = self.kernel
        prev = (
            mixed.new_zeros(mixed.shape[0], K - 1, mixed.shape[2])
            if state is None else state["conv"]
        )
        window = torch.cat((prev, mixed), 1)
        conv = F.silu(short_conv_kernel(window, self._conv_weight(mixed.dtype))[:, K - 1 :])
        q, k, v, g, beta = self._rule_inputs(conv, b, a)
        S = state["S"] if state is not None else None
        if S is not None and q.shape[2] == 1:
            o, S = gated_delta_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0],
                                    beta[:, :, 0], S)
            o = o[:, :, None]
        else:
            o, S = gated_delta_rule(q, k, v, g, beta, initial_state=S, return_state=True,
                                    block=self.block)
        conv_state = window[:, window.shape[1] - (K - 1) :].clone()
        return self._out(o, z), {"conv": conv_state, "S": S}


class GatedAttention(GroupedQueryAttention):
    """Qwen3.5's softmax attention (letter ``Q``): output-gated, q/k-normed, partial rotary,
    grouped-query; split by query and key/value heads over TP."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        o = cfg.gdn
        self.sp = sp
        H, KV, D = o.heads(cfg), o.kv_heads(cfg), o.head_dim(cfg)
        self.h, _ = local_heads(H, "gdn.attn_heads")
        self.kv, _ = local_heads(KV, "gdn.attn_kv_heads")
        self.d, self.rotary_dim, self.theta = D, o.rotary_dim(cfg), cfg.rope_theta
        self.q_proj = column_linear(cfg, mp, H * 2 * D)
        self.k_proj = column_linear(cfg, mp, KV * D)
        self.v_proj = column_linear(cfg, mp, KV * D)
        self.o_proj = row_linear(cfg, mp, H * D)
        self.q_norm = HeadRMSNorm(D, cfg.norm_eps)
        self.k_norm = HeadRMSNorm(D, cfg.norm_eps)

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        o, h = cfg.gdn, cfg.hidden_size
        H, KV, D = o.heads(cfg), o.kv_heads(cfg), o.head_dim(cfg)
        return h * (2 * H * D + 2 * KV * D) + H * D * h + 2 * D

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.gdn.attn_heads": cfg.gdn.heads(cfg),
                "model.gdn.attn_kv_heads": cfg.gdn.kv_heads(cfg)}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0

    def _qkv(self, x_BTC, positions_BT):
        B, T, _ = x_BTC.shape
        qg, _ = self.q_proj(x_BTC)
        q, gate = qg.view(B, T, self.h, 2 * self.d).chunk(2, -1)
        k, _ = self.k_proj(x_BTC)
        v, _ = self.v_proj(x_BTC)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(k.view(B, T, self.kv, self.d)).transpose(1, 2)
        v = v.view(B, T, self.kv, self.d).transpose(1, 2)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v, gate.reshape(B, T, self.h * self.d)

    def _out(self, o_BHTD, gate_BTC):
        B, H, T, D = o_BHTD.shape
        o = o_BHTD.transpose(1, 2).reshape(B, T, H * D) * torch.sigmoid(gate_BTC)
        out, _ = self.o_proj(o)
        return out
