"""Letters G and Q of a plait export: Qwen3.5's Gated DeltaNet and gated attention, the
HF-side modules of models/gdn/mixer.py (hf_export.py names the tensors). A pattern of G and
Q layers alone exports to transformers' own ``Qwen3_5ForCausalLM`` instead (models/gdn/
qwen35.py); these modules serve the hybrids that class cannot express (G or Q beside other
families' letters).

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_plait import PlaitConfig
from .plait_layers import (
    RMSNorm,
    apply_rotary,
    attend_grouped,
    rotary_cos_sin,
    wide,
)


def _gated_delta(q, k, v, g, beta, S, chunk: int = 64):
    """The gated delta rule S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t (q already scaled), continued from S [B, H, K, V], in float32, chunk by
    chunk: inside a chunk the UT transform (I + strictly-lower((beta k) k^T * decay))^-1 turns
    the sequential writes into matmuls. Returns (o [B, H, T, V], final S)."""
    B, H, T, K = q.shape
    outs = []
    for s in range(0, T, chunk):
        qc, kc, vc = (t[:, :, s : s + chunk] for t in (q, k, v))
        gc, bc = g[:, :, s : s + chunk], beta[:, :, s : s + chunk]
        L = qc.shape[2]
        G = gc.cumsum(-1)
        lower = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        decay = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()
        kb = kc * bc[..., None]
        A = ((kb @ kc.transpose(-1, -2)) * decay).tril(-1)
        Tm = torch.eye(L, dtype=q.dtype, device=q.device) + A
        eG = G.exp()[..., None]
        u = torch.linalg.solve_triangular(Tm, vc * bc[..., None], upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(Tm, kb * eG, upper=False, unitriangular=True)
        v_new = u - w @ S
        outs.append((qc * eG) @ S + ((qc @ kc.transpose(-1, -2)) * decay) @ v_new)
        k_end = kc * (G[..., -1:] - G).exp()[..., None]
        S = S * G[..., -1].exp()[..., None, None] + k_end.transpose(-1, -2) @ v_new
    return torch.cat(outs, 2), S


class GatedDeltaNet(nn.Module):
    """Letter G, Qwen3.5's Gated DeltaNet: q, k, v projections, a causal depthwise conv
    over [q | k | v] and SiLU, q and k L2-normalised per head and shared by value_heads /
    key_heads consecutive value heads, the gated delta rule with beta = sigmoid(b_proj x) and
    log-decay -exp(A_log) softplus(a_proj x + dt_bias), then RMSNorm(o) * weight *
    SiLU(z_proj x) per head and out_proj.

    State: ``conv``, the last K - 1 inputs of the convolution, and ``S`` [B, H, K, V], the
    rule's state in float32; a token needs nothing older. Padding: the layer's input is
    zeroed at pad positions (the release does the same), so a pad writes nothing (k = 0)."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h, o = config.hidden_size, config.options("gdn")
        self.hk, self.hv = o.get("key_heads", 4), o.get("value_heads", 4)
        self.dk, self.dv = o.get("key_dim", 32), o.get("value_dim", 32)
        self.kernel, self.chunk = o.get("conv_kernel", 4), o.get("chunk", 64)
        qk, vv = self.hk * self.dk, self.hv * self.dv
        self.q_proj = nn.Linear(h, qk, bias=False)
        self.k_proj = nn.Linear(h, qk, bias=False)
        self.v_proj = nn.Linear(h, vv, bias=False)
        self.z_proj = nn.Linear(h, vv, bias=False)
        self.b_proj = nn.Linear(h, self.hv, bias=False)
        self.a_proj = nn.Linear(h, self.hv, bias=False)
        self.q_conv = nn.Parameter(torch.zeros(qk, self.kernel))
        self.k_conv = nn.Parameter(torch.zeros(qk, self.kernel))
        self.v_conv = nn.Parameter(torch.zeros(vv, self.kernel))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.norm = RMSNorm(self.dv, config.norm_eps)
        self.out_proj = nn.Linear(vv, h, bias=False)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        if pad_BT is not None:
            x_BTC = x_BTC * (~pad_BT)[..., None].to(x_BTC.dtype)
        mixed = torch.cat([self.q_proj(x_BTC), self.k_proj(x_BTC), self.v_proj(x_BTC)], -1)
        K = self.kernel
        prev = mixed.new_zeros(B, K - 1, mixed.shape[2]) if state is None else state["conv"]
        window = torch.cat([prev, mixed], 1)
        w = torch.cat([self.q_conv, self.k_conv, self.v_conv], 0).to(mixed.dtype)
        conv = F.conv1d(window.transpose(1, 2), w[:, None], groups=w.shape[0]).transpose(1, 2)
        conv = F.silu(conv)
        qk = self.hk * self.dk
        q, k, v = conv.split([qk, qk, self.hv * self.dv], -1)
        rep = self.hv // self.hk

        def heads(t, n, d):
            return wide(t).reshape(B, T, n, d).transpose(1, 2)

        def l2(t):
            return t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6)

        q = l2(heads(q, self.hk, self.dk)).repeat_interleave(rep, 1) * self.dk**-0.5
        k = l2(heads(k, self.hk, self.dk)).repeat_interleave(rep, 1)
        v = heads(v, self.hv, self.dv)
        beta = wide(self.b_proj(x_BTC).sigmoid()).transpose(1, 2)
        a = self.a_proj(x_BTC).float() + self.dt_bias
        g = (-self.A_log.float().exp() * F.softplus(a)).transpose(1, 2)
        S = state["S"] if state is not None else q.new_zeros(B, self.hv, self.dk, self.dv)
        o, S = _gated_delta(q, k, v, g, beta, S, self.chunk)
        o = o.to(x_BTC.dtype).transpose(1, 2)  # [B, T, H, V]
        z = self.z_proj(x_BTC).view(B, T, self.hv, self.dv)
        y = wide(self.norm(o)) * F.silu(wide(z))
        out = self.out_proj(y.to(x_BTC.dtype).reshape(B, T, -1))
        return out, {"conv": window[:, window.shape[1] - (K - 1) :], "S": S}


class GatedAttention(nn.Module):
    """Letter Q, Qwen3.5's attention: q_proj gives each head its query and an output gate,
    per-head RMSNorms on q and k, rotary positions on the first partial_rotary x head_dim
    dims, grouped-query causal softmax, the output times sigmoid(gate), o_proj. State: the
    KV cache of the key/value heads and which cached keys are padding."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h, o = config.hidden_size, config.options("gdn")
        self.heads = o.get("attn_heads", 0) or config.num_heads
        self.kv = o.get("attn_kv_heads", 0) or self.heads
        self.d = o.get("attn_head_dim", 0) or config.head_dim
        self.rotary_dim = int(self.d * o.get("partial_rotary", 0.25))
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(h, self.heads * 2 * self.d, bias=False)
        self.k_proj = nn.Linear(h, self.kv * self.d, bias=False)
        self.v_proj = nn.Linear(h, self.kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, h, bias=False)
        self.q_norm = RMSNorm(self.d, config.norm_eps)
        self.k_norm = RMSNorm(self.d, config.norm_eps)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        q, gate = self.q_proj(x_BTC).view(B, T, self.heads, 2 * self.d).chunk(2, -1)
        q = self.q_norm(q).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BTC).view(B, T, self.kv, self.d)).transpose(1, 2)
        v = self.v_proj(x_BTC).view(B, T, self.kv, self.d).transpose(1, 2)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o, state = attend_grouped(q, k, v, pad_BT, state)
        o = o.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(o), state
