"""Bamba's two token mixers: the Mamba-2 mixer (letter ``D``, for the state-space Dual) and
Bamba's grouped-query attention (letter ``R``), computing what transformers' ``BambaMixer``
and ``BambaAttention`` compute (transformers 5.x, models/bamba/modeling_bamba.py).

D: x -> in_proj's four parts: the gate z [heads x head_dim], x [heads x head_dim], B and C
[groups x state each], dt_raw [heads] -> one causal depthwise convolution (with bias) over
[x | B | C] and SiLU -> dt = clamp(softplus(dt_raw + dt_bias)), A = -exp(A_log) -> per head h
(group h // (heads / groups)): the recurrence S_t = exp(dt_t A) S_{t-1} + B_t^T (dt_t x_t),
y_t = C_t S_t + D x_t -> RMSNorm(y * SiLU(z)) over each group's channels, times the weight ->
out_proj. The recurrence is plait's lightning kernel with per-token log-decays: q = C, k = B,
v = dt x, g = dt A, no slopes (kernels/lightning); under sequence parallelism, LASP-2 with
those decays (parallel/lasp2.py) and the convolution's K - 1 token halo.
R: q, k, v projections, rotary positions on the first partial_rotary x head_dim dims of every
head (rotate-half), grouped-query causal softmax, o_proj.

Where plait's layout differs from the release's (same function): the release fuses z, x, B,
C and dt into ``in_proj`` and x, B, C into one conv; plait keeps z, x, (B, C) and dt apart so
that a contiguous tensor-parallel split hands each rank whole heads of each
(models/mamba2/bamba.py re-fuses them). B and C are computed whole on every TP rank (their
weights replicated, the gradients summed over TP): a rank's heads need their groups' B and
C, and Bamba has one group for 128 heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from plait.kernels.lightning import lightning_attention, lightning_attention_step
from plait.kernels.shortconv import short_conv as short_conv_kernel
from plait.models.common.config import ModelConfig
from plait.models.common.layers import (
    apply_rotary,
    column_linear,
    local_heads,
    normal_init,
    rotary_cos_sin,
    row_linear,
    wide,
)
from plait.models.common.mixers import GroupedQueryAttention
from plait.parallel import convs, lasp2
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import mark_tp_sharded, shared_over_tp, sum_over_tp


def _initial_a_and_dt_bias(heads: int, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, dt_bias) for all heads: mamba_ssm's Mamba2 layer (A ~ U[1, 16]; dt log-uniform in
    [1e-3, 0.1], floored at 1e-4, stored as softplus^-1(dt)) or transformers' BambaMixer
    (A = 1..heads, dt_bias = 1)."""
    if init == "transformers":
        return torch.arange(1, heads + 1, dtype=torch.float32), torch.ones(heads)
    A = torch.empty(heads).uniform_(1.0, 16.0)
    dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt = dt.clamp_min(1e-4)
    return A, dt + torch.log(-torch.expm1(-dt))


class GroupGatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) over each group's channels (heads / groups heads), times the
    weight: the release's ``BambaRMSNormGated`` (gate first, float32, cast back before the
    weight). The weight is split with the heads; a group spread over several TP ranks sums
    its squares over them (``sum_over_tp``), so any heads/groups/TP shape normalises as the
    single process does."""

    def __init__(self, width: int, groups: int, eps: float, first: int, local: int):
        super().__init__()
        self.eps, self.size = eps, width // groups
        self.groups, self.first, self.local = groups, first, local
        self.weight = mark_tp_sharded(nn.Parameter(torch.ones(local)), 0)
        self.whole = first % self.size == 0 and local % self.size == 0

    def forward(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = wide(y) * F.silu(wide(z))
        sq = h.pow(2)
        if self.whole:  # this rank holds whole groups: no communication
            shape = (*sq.shape[:-1], self.local // self.size, self.size)
            var = sq.view(shape).mean(-1, keepdim=True).expand(shape).reshape(sq.shape)
        else:
            idx = (self.first + torch.arange(self.local, device=h.device)) // self.size
            sums = sq.new_zeros(*sq.shape[:-1], self.groups).index_add_(-1, idx, sq)
            var = sum_over_tp(sums)[..., idx] / self.size
        return self.weight * (h * torch.rsqrt(var + self.eps)).to(dtype)


class Mamba2Mixer(nn.Module):
    """Bamba's Mamba-2 layer (letter ``D``), split by heads over TP."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        o = cfg.mamba2
        self.sp, self.block, self.kernel = sp, o.chunk, o.conv_kernel
        self.h, first = local_heads(o.heads, "mamba2.heads")
        self.p, self.n, self.groups = o.head_dim, o.state, o.groups
        self.dt_min, self.dt_max = o.dt_min, o.dt_max
        width, bc = o.width, 2 * o.groups * o.state
        self.z_proj = column_linear(cfg, mp, width, o.proj_bias)
        self.x_proj = column_linear(cfg, mp, width, o.proj_bias)
        self.dt_proj = column_linear(cfg, mp, o.heads, o.proj_bias)
        self.bc_proj = nn.Linear(cfg.hidden_size, bc, bias=o.proj_bias)
        normal_init(cfg.init_std)(self.bc_proj.weight)
        if o.proj_bias:
            nn.init.zeros_(self.bc_proj.bias)
        self.out_proj = row_linear(cfg, mp, width, o.proj_bias)
        # Conv weights normal(std) with zero bias, D = 1 (BambaPreTrainedModel._init_weights);
        # A and dt as ``mamba2.init`` says. Drawn whole, then this rank's heads taken.
        local = slice(first * self.p, (first + self.h) * self.p)
        x_conv = torch.empty(width, o.conv_kernel).normal_(0.0, cfg.init_std)[local].clone()
        self.x_conv = mark_tp_sharded(nn.Parameter(x_conv), 0)
        self.bc_conv = nn.Parameter(torch.empty(bc, o.conv_kernel).normal_(0.0, cfg.init_std))
        if o.conv_bias:
            self.x_conv_bias = mark_tp_sharded(nn.Parameter(torch.zeros(self.h * self.p)), 0)
            self.bc_conv_bias = nn.Parameter(torch.zeros(bc))
        A, dt_bias = _initial_a_and_dt_bias(o.heads, o.init)
        heads = slice(first, first + self.h)
        self.A_log = mark_tp_sharded(nn.Parameter(A[heads].log()), 0)
        self.D = mark_tp_sharded(nn.Parameter(torch.ones(self.h)), 0)
        self.dt_bias = mark_tp_sharded(nn.Parameter(dt_bias[heads].clone()), 0)
        self.norm = GroupGatedRMSNorm(
            width, o.groups, cfg.norm_eps, first * self.p, self.h * self.p
        )
        per_group = o.heads // o.groups
        self.register_buffer(
            "group_of_head", torch.arange(first, first + self.h) // per_group, persistent=False
        )

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        o, d = cfg.mamba2, cfg.hidden_size
        conv_ch = o.width + 2 * o.groups * o.state
        proj_out = o.width + conv_ch + o.heads
        bias = (proj_out + d) if o.proj_bias else 0
        conv = conv_ch * (o.conv_kernel + (1 if o.conv_bias else 0))
        return d * proj_out + o.width * d + bias + conv + 3 * o.heads + o.width

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.mamba2.heads": cfg.mamba2.heads}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "model.mamba2.conv_kernel", cfg.mamba2.conv_kernel - 1

    def _project(self, x_BTC):
        """(the convolution's input [B, T, x | B | C], z, dt_raw) for this rank's heads."""
        z, _ = self.z_proj(x_BTC)
        xs, _ = self.x_proj(x_BTC)
        dt, _ = self.dt_proj(x_BTC)
        bias = shared_over_tp(self.bc_proj.bias) if self.bc_proj.bias is not None else None
        bc = F.linear(shared_over_tp(x_BTC), shared_over_tp(self.bc_proj.weight), bias)
        return torch.cat([xs, bc], -1), z, dt

    def _conv_params(self, dtype):
        w = torch.cat([self.x_conv, shared_over_tp(self.bc_conv)], 0).to(dtype)
        if not hasattr(self, "x_conv_bias"):
            return w, None
        b = torch.cat([self.x_conv_bias, shared_over_tp(self.bc_conv_bias)], 0).to(dtype)
        return w, b

    def _ssm_inputs(self, conv_BTC, dt_raw):
        """q = C, k = B [B, h, T, state] (each head its group's), v = dt x [B, h, T, head_dim],
        g = dt A [B, h, T] in float32, and x [B, T, h, head_dim] for the D skip."""
        B, T, _ = conv_BTC.shape
        xs, b, c = conv_BTC.split([self.h * self.p, self.groups * self.n, self.groups * self.n], -1)
        x = xs.view(B, T, self.h, self.p)
        b, c = (
            t.view(B, T, self.groups, self.n).index_select(2, self.group_of_head).transpose(1, 2)
            for t in (b, c)
        )
        dt = F.softplus(dt_raw.float() + self.dt_bias.float())
        if self.dt_min > 0 or self.dt_max > 0:
            dt = dt.clamp(self.dt_min, self.dt_max or None)
        g = (dt * -self.A_log.float().exp()).transpose(1, 2)
        v = (x * dt[..., None]).to(x.dtype).transpose(1, 2)
        return c, b, v, g.contiguous(), x

    def _out(self, o_BHTP, x_BTHP, z_BTC):
        B, H, T, P = o_BHTP.shape
        y = wide(o_BHTP).transpose(1, 2) + wide(x_BTHP) * self.D.float()[:, None]
        y = self.norm(y.reshape(B, T, H * P), z_BTC, z_BTC.dtype)
        out, _ = self.out_proj(y)
        return out

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        mixed, z, dt = self._project(x_BTC)
        w, b = self._conv_params(mixed.dtype)
        conv = F.silu(convs.short_conv(self.sp, mixed, w, b, doc_ids_BT))
        q, k, v, g, x = self._ssm_inputs(conv, dt)
        slopes = torch.zeros(self.h, device=q.device)
        o = lasp2.lightning(self.sp, q, k, v, slopes, doc_ids_BT, block=self.block, g=g)
        return self._out(o, x, z)

    def decode(self, x_BTC, positions_BT, state):
        """Decode form (family.py's contract). ``state["conv"]`` [B, K - 1, channels] holds
        the last K - 1 inputs of the convolution (zeros before the start, as its padding),
        ``state["S"]`` [B, h, state, head_dim] the recurrence's state in float32."""
        mixed, z, dt = self._project(x_BTC)
        K = self.kernel
        prev = (
            mixed.new_zeros(mixed.shape[0], K - 1, mixed.shape[2])
            if state is None else state["conv"]
        )
        window = torch.cat((prev, mixed), 1)
        w, b = self._conv_params(mixed.dtype)
        conv = F.silu(short_conv_kernel(window, w, b)[:, K - 1 :])
        q, k, v, g, x = self._ssm_inputs(conv, dt)
        slopes = torch.zeros(self.h, device=q.device)
        S = state["S"] if state is not None else None
        if S is not None and q.shape[2] == 1:
            o, S = lightning_attention_step(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], slopes, S, g_BH=g[:, :, 0]
            )
            o = o[:, :, None]
        else:
            o, S = lightning_attention(
                q, k, v, slopes, initial_state=S, return_state=True, block=self.block, g=g
            )
        conv_state = window[:, window.shape[1] - (K - 1) :].clone()
        return self._out(o, x, z), {"conv": conv_state, "S": S}


class GroupedAttention(GroupedQueryAttention):
    """Bamba's softmax attention (letter ``R``): grouped-query, rotary positions on the first
    partial_rotary x head_dim dims; split by query and key/value heads over TP."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        o = cfg.mamba2
        self.sp = sp
        H, KV, D = cfg.num_heads, o.kv_heads(cfg), cfg.head_dim
        self.h, _ = local_heads(H, "model.num_heads")
        self.kv, _ = local_heads(KV, "mamba2.attn_kv_heads")
        self.d, self.rotary_dim, self.theta = D, o.rotary_dim(cfg), cfg.rope_theta
        self.q_proj = column_linear(cfg, mp, H * D)
        self.k_proj = column_linear(cfg, mp, KV * D)
        self.v_proj = column_linear(cfg, mp, KV * D)
        self.o_proj = row_linear(cfg, mp, H * D)

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        H, KV, D = cfg.num_heads, cfg.mamba2.kv_heads(cfg), cfg.head_dim
        return cfg.hidden_size * (2 * H * D + 2 * KV * D)

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.num_heads": cfg.num_heads,
                "model.mamba2.attn_kv_heads": cfg.mamba2.kv_heads(cfg)}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0

    def _qkv(self, x_BTC, positions_BT):
        B, T, _ = x_BTC.shape
        q, _ = self.q_proj(x_BTC)
        k, _ = self.k_proj(x_BTC)
        v, _ = self.v_proj(x_BTC)
        q = q.view(B, T, self.h, self.d).transpose(1, 2)
        k = k.view(B, T, self.kv, self.d).transpose(1, 2)
        v = v.view(B, T, self.kv, self.d).transpose(1, 2)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v, None

    def _out(self, o_BHTD, _):
        B, H, T, D = o_BHTD.shape
        out, _ = self.o_proj(o_BHTD.transpose(1, 2).reshape(B, T, H * D))
        return out
