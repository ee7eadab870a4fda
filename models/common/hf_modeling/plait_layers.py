"""The pieces every plait export's modeling code shares: norms, rotary positions,
attention over a cache, the channel mixers, and letter A (causal softmax attention), the
softmax layer of every hybrid.

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_plait import PlaitConfig


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32 (norms, rotary and recurrences run in float32 for bf16 models)."""
    return x if x.dtype == torch.float64 else x.float()


class RMSNorm(nn.Module):
    """x / rms(x) * weight; without a weight (``learnable=False``): TransNormerLLM's SRMSNorm."""

    def __init__(self, dim: int, eps: float, learnable: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """GPT-2's LayerNorm, in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        w, b = self.weight.to(xf.dtype), self.bias.to(xf.dtype)
        return F.layer_norm(xf, xf.shape[-1:], w, b, self.eps).to(x.dtype)


def make_norm(config: PlaitConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.hidden_size
    if config.norm == "layernorm":
        return LayerNorm(dim, config.norm_eps)
    return RMSNorm(dim, config.norm_eps, learnable=config.norm == "rmsnorm")


def rotary_cos_sin(positions_BT: torch.Tensor, rotary_dim: int, theta: float):
    """cos and sin tables [B, 1, T, rotary_dim / 2] at the given positions."""
    exponents = torch.arange(0, rotary_dim, 2, device=positions_BT.device).float() / rotary_dim
    angles_BTF = positions_BT.float()[..., None] / theta**exponents
    return angles_BTF.cos()[:, None], angles_BTF.sin()[:, None]


def apply_rotary(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (GPT-NeoX / LLaMA) on the first 2 * cos.shape[-1] dims of each head;
    the rest pass through (partial rotary)."""
    r = 2 * cos.shape[-1]
    x1, x2 = wide(x_BHTD[..., :r]).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BHTD.dtype)
    return torch.cat((out, x_BHTD[..., r:]), dim=-1)


def attend_cached(
    q_BHTD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    key_pad_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention of T new queries over S keys whose last T are theirs (a KV
    cache plus the new tokens), padded keys masked. A query with no key left (a padding
    query) sees the causal keys instead, so its (ignored) output stays finite."""
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    if key_pad_BS is None or not key_pad_BS.any():
        if T == 1:
            return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD)
        if T == S:
            return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, is_causal=True)
        key_pad_BS = None
    causal = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)
    mask = causal[None].expand(q_BHTD.shape[0], T, S)
    if key_pad_BS is not None:
        mask = mask & ~key_pad_BS[:, None, :]
        mask = mask | (causal & ~mask.any(-1, keepdim=True))
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask[:, None])


def cat_state(
    state: dict | None, key: str, new: torch.Tensor, dim: int, keep: int | None = None
) -> torch.Tensor:
    """``new`` appended to ``state[key]`` along ``dim`` (the last ``keep`` entries only,
    when given): KV caches and convolution tails."""
    out = new if state is None else torch.cat((state[key], new), dim)
    if keep is not None:
        out = out.narrow(dim, max(out.shape[dim] - keep, 0), min(keep, out.shape[dim]))
    return out


def kv_cache(state: dict | None, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor,
             pad_BT: torch.Tensor | None) -> dict:
    """A softmax layer's cache after this call: its keys, values and padding flags appended
    (no padding given: none of the T new tokens is padding)."""
    B, _, T, _ = k_BHTD.shape
    pad = pad_BT if pad_BT is not None else torch.zeros(B, T, dtype=torch.bool)
    return {
        "k": cat_state(state, "k", k_BHTD, 2),
        "v": cat_state(state, "v", v_BHTD, 2),
        "pad": cat_state(state, "pad", pad.to(k_BHTD.device), 1),
    }


def attend_grouped(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
                   pad_BT: torch.Tensor | None, state: dict | None):
    """Grouped-query attention over the cache (Qwen3.5's and Bamba's layers): the new keys
    and values of the K key/value heads appended to ``state``, each repeated over the
    H / K consecutive query heads it serves. Returns (o [B, H, T, D], the new state)."""
    state = kv_cache(state, k_BKTD, v_BKTD, pad_BT)
    rep = q_BHTD.shape[1] // k_BKTD.shape[1]
    o = attend_cached(q_BHTD, state["k"].repeat_interleave(rep, 1),
                      state["v"].repeat_interleave(rep, 1), state["pad"])
    return o, state


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (act = SiLU) or TransNormerLLM's SGLU (no act)."""

    def __init__(self, config: PlaitConfig):
        super().__init__()
        h, f = config.hidden_size, config.ffn_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)
        self.silu = config.mlp == "swiglu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        return self.down_proj((F.silu(gate) if self.silu else gate) * self.up_proj(x))


class GeluMLP(nn.Module):
    """GPT-2's MLP (H3's channel mixer): fc2(gelu(fc1(x)))."""

    def __init__(self, config: PlaitConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_size)
        self.fc2 = nn.Linear(config.ffn_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SoftmaxAttention(nn.Module):
    """LLaMA's attention: q, k, v projections, rotary positions (optionally on the first
    ``rotary_dim`` dims only, or none), causal softmax, output projection; biases with
    ``softmax.bias`` (flash-attn's MHA in H3's models). State: the KV cache and which cached
    keys are padding."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.options("softmax")
        self.heads, self.head_dim = config.num_heads, config.head_dim
        bias = opts.get("bias", False)
        self.q_proj = nn.Linear(h, h, bias=bias)
        self.k_proj = nn.Linear(h, h, bias=bias)
        self.v_proj = nn.Linear(h, h, bias=bias)
        self.o_proj = nn.Linear(h, h, bias=bias)
        rotary = opts.get("rotary", True)
        self.rotary_dim = (opts.get("rotary_dim", 0) or self.head_dim) if rotary else 0
        self.rope_theta = config.rope_theta

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape

        def heads(t):
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_BTC)), heads(self.k_proj(x_BTC)), heads(self.v_proj(x_BTC))
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        state = kv_cache(state, k, v, pad_BT)
        o = attend_cached(q, state["k"], state["v"], state["pad"])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state
