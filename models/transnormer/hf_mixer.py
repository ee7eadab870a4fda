"""Letter L of a plait export: lightning attention (TransNormerLLM), the HF-side module
that models/transnormer/mixer.py's layer maps to (hf_export.py names the tensors).

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_plait import PlaitConfig
from .plait_layers import RMSNorm, wide


def _alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes 2^(-8(h+1)/n); for n not a power of two, those of the power of two
    below n followed by every other slope of the power of two above (TransNormerLLM's
    ``_build_slope_tensor``)."""

    def power_of_two(m: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]

    if n & (n - 1) == 0:
        return power_of_two(n)
    lower = 2 ** math.floor(math.log2(n))
    return power_of_two(lower) + power_of_two(2 * lower)[0::2][: n - lower]


def _lightning_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates s_h of one layer (lambda_h = exp(-s_h)): the ALiBi slopes scaled
    by 1 - l / (L - 1) + 1e-5, so the lowest layer decays fastest (local mixing) and the top
    one hardly at all (global mixing). Fixed, not learned."""
    depth = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return torch.tensor(_alibi_slopes(num_heads), dtype=torch.float32) * depth


class _Lrpe(nn.Module):
    """Linearised relative positional encoding: x -> [x cos(theta n), x sin(theta n)] (the
    head dim doubles). q_n . k_m then sums x_i y_i cos(theta_i (n - m)), a function of n - m
    only, which linear attention can carry. ``theta`` [H, 1, d] is learned."""

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        d = num_heads * head_dim
        theta = 10000.0 ** (-2.0 / d * torch.arange(d, dtype=torch.float32))
        self.theta = nn.Parameter(theta.view(num_heads, 1, head_dim))

    def forward(self, x_BHTD: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
        angles = self.theta.float()[None] * positions_BT.float()[:, None, :, None]
        x = x_BHTD.float()
        return torch.cat([x * angles.cos(), x * angles.sin()], dim=-1).to(x_BHTD.dtype)


def _lightning_attention(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    s_H: torch.Tensor,
    kv_BHDE: torch.Tensor | None,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with decay, continued from the state ``kv``:

        o_t = q_t kv_t,   kv_t = lambda kv_{t-1} + k_t^T v_t,   lambda = exp(-s_h),

    computed block by block (Lightning Attention-2): inside a block of m tokens the masked
    product ((Q K^T) * decay) V, plus the state entering the block read by Q decayed by
    lambda^(a+1); then the state moves on by lambda^m plus the block's decayed K^T V. A block
    of one token is exactly one step of the recurrence. Float32; returns (o, final state).
    """
    B, H, T, D = q_BHTD.shape
    q, k, v = wide(q_BHTD), wide(k_BHTD), wide(v_BHTE)
    s = s_H.to(q.device, q.dtype)
    kv = kv_BHDE if kv_BHDE is not None else q.new_zeros(B, H, D, v.shape[-1])
    outs = []
    for start in range(0, T, block):
        qi, ki, vi = (t[:, :, start : start + block] for t in (q, k, v))
        m = qi.shape[2]
        pos = torch.arange(m, device=q.device, dtype=q.dtype)
        dist = pos[:, None] - pos[None, :]
        diag_decay = torch.exp((-s[:, None, None] * dist).masked_fill(dist < 0, float("-inf")))
        q_decay = torch.exp(-s[:, None, None] * (pos[:, None] + 1))  # [H, m, 1]
        k_decay = torch.exp(-s[:, None, None] * (m - 1 - pos[:, None]))  # [H, m, 1]
        intra = ((qi @ ki.transpose(-1, -2)) * diag_decay) @ vi
        outs.append(intra + (qi * q_decay) @ kv)
        kv = torch.exp(-s * m)[:, None, None] * kv + (ki * k_decay).transpose(-1, -2) @ vi
    return torch.cat(outs, dim=2), kv


class LightningAttention(nn.Module):
    """TransNormerLLM's NormLinearAttention: one projection ``qkvu_proj`` chunked into q, k,
    v, u (each "(h d)"); SiLU on q and k; LRPE on q and k where the layer has it (``lrpe``:
    "first" L layer or "all"); causal linear attention with the layer's fixed per-head decay;
    SRMSNorm of the output (``lightning_norm`` "full": over the whole width as released;
    "head": per head); times u (no activation); ``out_proj``.

    State: ``{"kv": [B, H, D, d]}`` in float32 (D = 2d with LRPE), the decayed sum of
    k_j^T v_j so far. It is all a new token needs: its output is q kv after the update, LRPE
    takes the absolute position that comes with the token, and norm and gate are per token.
    Padding: k and v are zeroed at pad positions, so a pad adds nothing to the state.
    """

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_heads, config.head_dim
        inner = self.heads * self.head_dim
        self.qkvu_proj = nn.Linear(h, 4 * inner, bias=False)
        self.out_proj = nn.Linear(inner, h, bias=False)
        first_l = config.pattern.index("L")
        if config.lrpe == "all" or (config.lrpe == "first" and layer_idx == first_l):
            self.lrpe = _Lrpe(self.heads, self.head_dim)
        else:
            self.lrpe = None
        self.full_norm = config.lightning_norm == "full"
        width = inner if self.full_norm else self.head_dim
        self.norm = RMSNorm(width, config.norm_eps, learnable=False)
        self.block = config.lightning_block
        self.layer_idx, self.num_layers = layer_idx, config.num_layers

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        q, k, v, u = self.qkvu_proj(x_BTC).chunk(4, dim=-1)
        q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = F.silu(q), F.silu(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions_BT), self.lrpe(k, positions_BT)
        if pad_BT is not None:
            real = (~pad_BT)[:, None, :, None].to(k.dtype)
            k, v = k * real, v * real
        kv = state["kv"] if state is not None else None
        # The decay is fixed by design: made here in float32 (neither a parameter nor a
        # buffer, so a bf16 cast or meta-device loading cannot touch it).
        slopes = _lightning_decay(self.heads, self.layer_idx, self.num_layers)
        o, kv = _lightning_attention(q, k, v, slopes, kv, self.block)
        o = o.to(x_BTC.dtype)
        if self.full_norm:
            o = self.norm(o.transpose(1, 2).reshape(B, T, -1))
        else:
            o = self.norm(o).transpose(1, 2).reshape(B, T, -1)
        return self.out_proj(o * u), {"kv": kv}
