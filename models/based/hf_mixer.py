"""Letters B, W and C of a plait export: Based's Taylor linear attention, sliding-window
attention and gated short convolution, the HF-side modules of models/based/mixer.py.

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .plait_layers import apply_rotary, cat_state, rotary_cos_sin, wide


def _taylor_features(x_BHTF: torch.Tensor) -> torch.Tensor:
    """Based's 2nd-order Taylor feature map, phi(q) . phi(k) = 1 + s + s^2 / 2 with
    s = q . k / sqrt(f): the first three terms of exp(s).

        phi(x) = [1, x / f^(1/4), x_i x_j / (sqrt(2) sqrt(f)) for all i, j]

    is the released map (1 + f + f^2 features, 273 at f = 16). Here each unordered pair
    i < j appears once with the factor sqrt(2) its duplicate would have added, which keeps
    the dot products exactly and the state smaller: 1 + f + f(f + 1) / 2 = 153 features."""
    f = x_BHTF.shape[-1]
    x = wide(x_BHTF)
    i, j = torch.triu_indices(f, f, device=x.device)
    pair_scale = torch.where(i == j, 1 / math.sqrt(2), 1.0).to(x.dtype) / math.sqrt(f)
    return torch.cat(
        [torch.ones_like(x[..., :1]), x / f**0.25, x[..., i] * x[..., j] * pair_scale], -1
    )


class BasedLinearAttention(nn.Module):
    """Letter B, Based's linear attention (the released ``LinearAttention``): q and k are
    projected to ``feature_dim`` per head and mapped by the Taylor features phi, and

        y_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),   S_t = sum_{j<=t} phi(k_j)^T v_j,
                                                      z_t = sum_{j<=t} phi(k_j),

    then the output projection. State: ``kv_state`` S [B, H, F, d] and ``k_state`` z
    [B, H, F] (float32), all of the past any later output needs. The full sequence runs in
    chunks of ``lightning_block`` tokens: exact attention inside a chunk, the state for
    everything before it. Padding tokens get phi(k) = 0 (the map has a constant 1, so a zero
    key is not enough) and v = 0: they add nothing to S or z."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.options("based")
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.feature_dim = opts.get("feature_dim", 16)
        self.eps = opts.get("eps", 1e-6)
        self.chunk = config.lightning_block
        self.proj_q = nn.Linear(h, self.heads * self.feature_dim, bias=False)
        self.proj_k = nn.Linear(h, self.heads * self.feature_dim, bias=False)
        self.proj_v = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape

        def heads(t, dim):
            return t.view(B, T, self.heads, dim).transpose(1, 2)

        q = _taylor_features(heads(self.proj_q(x_BTC), self.feature_dim))
        k = _taylor_features(heads(self.proj_k(x_BTC), self.feature_dim))
        v = wide(heads(self.proj_v(x_BTC), self.head_dim))
        if pad_BT is not None:
            real = (~pad_BT).to(k.dtype)[:, None, :, None]
            k, v = k * real, v * real
        if state is None:
            S = k.new_zeros(B, self.heads, k.shape[-1], self.head_dim)
            z = k.new_zeros(B, self.heads, k.shape[-1])
        else:
            S, z = state["kv_state"].to(k.dtype), state["k_state"].to(k.dtype)
        outs = []
        for s in range(0, T, self.chunk):
            qc, kc, vc = (t[:, :, s : s + self.chunk] for t in (q, k, v))
            A = (qc @ kc.transpose(-1, -2)).tril()  # phi(q_t) . phi(k_j), j <= t in the chunk
            num = A @ vc + qc @ S
            den = A.sum(-1) + (qc @ z[..., None])[..., 0]
            outs.append(num / (den[..., None] + self.eps))
            S = S + kc.transpose(-1, -2) @ vc
            z = z + kc.sum(2)
        y = torch.cat(outs, 2).to(x_BTC.dtype)
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, -1))
        return y, {"kv_state": S, "k_state": z}


class SlidingWindowAttention(nn.Module):
    """Letter W, Based's sliding-window attention (the released ``SlidingAttention``): the
    fused ``Wqkv`` projection ([q; k; v]), rotary positions as in letter A
    (``softmax.rotary`` / ``rotary_dim``), causal softmax over the last ``based.window`` keys
    (the query's own included; the released window_size 256 is flash-attn's (128, 0): 129),
    output projection. State: the rotated keys, values and padding flags of the last
    window - 1 tokens, all any later query can see. Queries run in blocks (of ``window``, at
    least 64), each over its own keys and the window - 1 before, so a long sequence costs
    O(T * window)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.window = config.options("based").get("window", 64)
        self.block = max(self.window, 64)  # queries per block
        bias = config.options("softmax").get("bias", False)  # W shares letter A's options
        self.Wqkv = nn.Linear(h, 3 * h, bias=bias)
        self.out_proj = nn.Linear(h, h, bias=bias)
        opts = config.options("softmax")
        rotary = opts.get("rotary", True)
        self.rotary_dim = (opts.get("rotary_dim", 0) or self.head_dim) if rotary else 0
        self.rope_theta = config.rope_theta

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        qkv = self.Wqkv(x_BTC).view(B, T, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, d] each
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        pad = pad_BT if pad_BT is not None else torch.zeros(B, T, dtype=torch.bool)
        pad = pad.to(x_BTC.device)
        keys, values = cat_state(state, "k", k, 2), cat_state(state, "v", v, 2)
        key_pad = cat_state(state, "pad", pad, 1)
        cached = keys.shape[2] - T
        outs = []
        for s in range(0, T, self.block):
            e = min(s + self.block, T)
            lo = max(cached + s - (self.window - 1), 0)  # the first key query s can see
            i = torch.arange(cached + s, cached + e, device=q.device)[:, None]
            j = torch.arange(lo, cached + e, device=q.device)[None, :]
            in_window = (i - j >= 0) & (i - j < self.window)
            mask = in_window & ~key_pad[:, None, lo : cached + e]
            # a padding query has no real key: let it see its window so the output is finite
            mask = mask | (in_window & ~mask.any(-1, keepdim=True))
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, s:e], keys[:, :, lo : cached + e], values[:, :, lo : cached + e],
                    attn_mask=mask[:, None],
                )
            )
        o = torch.cat(outs, 2).transpose(1, 2).reshape(B, T, -1)
        first = max(keys.shape[2] - (self.window - 1), 0)
        state = {"k": keys[:, :, first:], "v": values[:, :, first:], "pad": key_pad[:, first:]}
        return self.out_proj(o), state


class _ShortConvolution(nn.Module):
    """The released ``ShortConvolution``: a depthwise causal ``nn.Conv1d`` (kernel K, no
    bias) over [B, T, channels], continued from the last K - 1 inputs (zeros at the start)."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, u_BTC: torch.Tensor, tail_BKC: torch.Tensor | None):
        B, _, C = u_BTC.shape
        if tail_BKC is None:
            tail_BKC = u_BTC.new_zeros(B, self.kernel_size - 1, C)
        u = torch.cat((tail_BKC, u_BTC), 1)
        y = F.conv1d(u.transpose(1, 2), self.conv.weight.to(u.dtype), groups=C)
        return y.transpose(1, 2), u[:, u.shape[1] - (self.kernel_size - 1) :]


class GatedShortConv(nn.Module):
    """Letter C, Based's gated convolution (the released ``BaseConv``): ``in_proj`` (with
    bias) to a convolved half u1 and a gate half u2 of ``conv_expand * hidden / 2`` channels
    each, y = out_proj(SiLU(conv(u1)) * u2). State: ``conv``, the last K - 1 inputs u1
    [B, K - 1, channels]. Padding tokens enter the convolution as zeros (the bias makes u1
    nonzero even for a zero x)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.options("based")
        self.d_inner = opts.get("conv_expand", 4) * h // 2
        self.in_proj = nn.Linear(h, 2 * self.d_inner, bias=True)
        self.conv = _ShortConvolution(self.d_inner, opts.get("conv_kernel", 3))
        self.out_proj = nn.Linear(self.d_inner, h, bias=True)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        u1, u2 = self.in_proj(x_BTC).split(self.d_inner, -1)
        if pad_BT is not None:
            u1 = u1 * (~pad_BT)[..., None].to(u1.dtype)
        u_conv, tail = self.conv(u1, None if state is None else state["conv"])
        return self.out_proj(F.silu(u_conv) * u2), {"conv": tail}
