"""Letters D and R of a plait export: Bamba's Mamba-2 mixer and grouped-query attention, the
HF-side modules of models/mamba2/mixer.py (hf_export.py names the tensors). A pattern of D
and R layers alone exports to transformers' own ``BambaForCausalLM`` instead (models/mamba2/
bamba.py); these modules serve the hybrids that class cannot express (D or R beside other
families' letters).

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_plait import PlaitConfig
from .plait_layers import apply_rotary, attend_grouped, rotary_cos_sin, wide


def _ssd(q, k, v, g, S, chunk: int = 64):
    """S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t, continued from S [B, H, N, P], in
    float32, chunk by chunk (the decays inside a chunk as exp of differences of the running
    sum of g). Returns (o [B, H, T, P], final S)."""
    T = q.shape[2]
    outs = []
    for s in range(0, T, chunk):
        qc, kc, vc, gc = (t[:, :, s : s + chunk] for t in (q, k, v, g))
        L = qc.shape[2]
        G = gc.cumsum(-1)
        lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
        outs.append((qc * G.exp()[..., None]) @ S + ((qc @ kc.transpose(-1, -2)) * decay) @ vc)
        k_end = kc * (G[..., -1:] - G).exp()[..., None]
        S = S * G[..., -1].exp()[..., None, None] + k_end.transpose(-1, -2) @ vc
    return torch.cat(outs, 2), S


class _GroupNormWeight(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))


class Mamba2Mixer(nn.Module):
    """Letter D, Bamba's Mamba-2 mixer: z, x, (B, C) and dt projections, a causal depthwise
    conv (with bias) over [x | B | C] and SiLU, dt = clamp(softplus(dt + dt_bias)),
    A = -exp(A_log); per head the recurrence S_t = exp(dt A) S_{t-1} + B_t^T (dt x_t),
    y = C_t S_t + D x_t (head h reads group h // (heads / groups) of B and C); then
    RMSNorm(y * SiLU(z)) over each group's channels, times the weight, and out_proj.

    State: ``conv``, the last K - 1 inputs of the convolution, and ``S`` [B, H, N, P] in
    float32. Padding: the layer's input and the convolution's output are zeroed at pad
    positions (the release does the same), so a pad writes nothing into the state."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h, o = config.hidden_size, config.options("mamba2")
        self.heads, self.p = o.get("heads", 8), o.get("head_dim", 16)
        self.groups, self.n = o.get("groups", 1), o.get("state", 16)
        self.kernel, self.chunk = o.get("conv_kernel", 4), o.get("chunk", 64)
        self.dt_min, self.dt_max = o.get("dt_min", 0.0), o.get("dt_max", 0.0)
        self.eps = config.norm_eps
        width, bc, bias = self.heads * self.p, 2 * self.groups * self.n, o.get("proj_bias", False)
        self.z_proj = nn.Linear(h, width, bias=bias)
        self.x_proj = nn.Linear(h, width, bias=bias)
        self.bc_proj = nn.Linear(h, bc, bias=bias)
        self.dt_proj = nn.Linear(h, self.heads, bias=bias)
        self.x_conv = nn.Parameter(torch.zeros(width, self.kernel))
        self.bc_conv = nn.Parameter(torch.zeros(bc, self.kernel))
        if o.get("conv_bias", True):
            self.x_conv_bias = nn.Parameter(torch.zeros(width))
            self.bc_conv_bias = nn.Parameter(torch.zeros(bc))
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.norm = _GroupNormWeight(width)
        self.out_proj = nn.Linear(width, h, bias=bias)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        keep = None if pad_BT is None else (~pad_BT)[..., None].to(x_BTC.dtype)
        if keep is not None:
            x_BTC = x_BTC * keep
        mixed = torch.cat([self.x_proj(x_BTC), self.bc_proj(x_BTC)], -1)
        K = self.kernel
        prev = mixed.new_zeros(B, K - 1, mixed.shape[2]) if state is None else state["conv"]
        window = torch.cat([prev, mixed], 1)
        w = torch.cat([self.x_conv, self.bc_conv], 0).to(mixed.dtype)
        bias = (torch.cat([self.x_conv_bias, self.bc_conv_bias]).to(mixed.dtype)
                if hasattr(self, "x_conv_bias") else None)
        conv = F.silu(F.conv1d(window.transpose(1, 2), w[:, None], bias, groups=w.shape[0]))
        conv = conv.transpose(1, 2)
        if keep is not None:
            conv = conv * keep
        width, gn = self.heads * self.p, self.groups * self.n
        xs, b, c = conv.split([width, gn, gn], -1)
        x = wide(xs).reshape(B, T, self.heads, self.p)
        rep = self.heads // self.groups
        b, c = (wide(t).reshape(B, T, self.groups, self.n).repeat_interleave(rep, 2).transpose(1, 2)
                for t in (b, c))
        dt = F.softplus(self.dt_proj(x_BTC).float() + self.dt_bias.float())
        if self.dt_min > 0 or self.dt_max > 0:
            dt = dt.clamp(self.dt_min, self.dt_max or math.inf)
        g = (dt * -self.A_log.float().exp()).transpose(1, 2)
        v = (x * dt[..., None]).transpose(1, 2)
        S = state["S"] if state is not None else x.new_zeros(B, self.heads, self.n, self.p)
        o, S = _ssd(c, b, v, g, S, self.chunk)
        y = o.transpose(1, 2) + x * self.D.float()[:, None]  # [B, T, H, P]
        h = y.reshape(B, T, width) * F.silu(wide(self.z_proj(x_BTC)))
        hg = h.view(B, T, self.groups, width // self.groups)
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.norm.weight * hg.reshape(B, T, width).to(x_BTC.dtype)
        out = self.out_proj(y.to(x_BTC.dtype))
        return out, {"conv": window[:, window.shape[1] - (K - 1) :], "S": S}


class GroupedAttention(nn.Module):
    """Letter R, Bamba's attention: q, k, v projections, rotary positions on the first
    partial_rotary x head_dim dims, grouped-query causal softmax, o_proj. State: the KV cache
    of the key/value heads and which cached keys are padding."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h, o = config.hidden_size, config.options("mamba2")
        self.heads, self.d = config.num_heads, config.head_dim
        self.kv = o.get("attn_kv_heads", 0) or self.heads
        self.rotary_dim = int(self.d * o.get("partial_rotary", 0.5))
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(h, self.heads * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, h, bias=False)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        q = self.q_proj(x_BTC).view(B, T, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x_BTC).view(B, T, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x_BTC).view(B, T, self.kv, self.d).transpose(1, 2)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o, state = attend_grouped(q, k, v, pad_BT, state)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state
