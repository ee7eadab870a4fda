"""Modeling code of a plait hybrid language model, for ``transformers`` with
``trust_remote_code=True``.

Plain PyTorch, importing nothing from plait: written beside the weights by
``python -m plait.launcher.export`` so that an exported model loads, generates and
evaluates anywhere transformers runs. It computes what plait's own model computes (tested:
logits within 1e-4 in fp32, greedy generation token for token).

The model is a stack of pre-norm residual blocks, one per letter of ``config.pattern``:
``x + mixer(norm(x))`` then ``x + mlp(norm(x))``. The token mixers, by letter:

    A  causal softmax attention with rotary positions (LLaMA's)
    L  lightning attention: linear attention with a per-head decay (TransNormerLLM)
    B  linear attention on a Taylor feature map (Based)
    W  sliding-window softmax attention (Based)
    C  gated short convolution (Based)
    H  H3: a shift SSM on k, a diagonal SSM on k v^T, multiplicative gates
    S  SeqBoat: an EMA, a router, local attention over the active tokens only
    M  mixture-of-head attention: shared heads plus top-k routed heads per token (MoH)

Generation: every mixer has one ``forward(x, positions, pad, state) -> (y, state)`` that
continues a sequence from ``state`` (None: the start). The state of a linear or SSM letter
has a fixed size (a [d, d] matrix per head, an SSM state, a convolution tail), so the cost of
a token does not grow with the context; softmax letters keep a KV cache. ``PlaitCache`` holds
one state per layer. Left-padded batches work: a padded token enters no state and is no key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_plait import PlaitConfig

# ----------------------------------------------------------------------------------------
# Shared pieces: norms, rotary positions, attention over a cache, channel mixers
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Letter A: causal softmax attention
# ----------------------------------------------------------------------------------------


class SoftmaxAttention(nn.Module):
    """LLaMA's attention: q, k, v projections, rotary positions (optionally on the first
    ``rotary_dim`` dims only, or none), causal softmax, output projection; biases with
    ``softmax.bias`` (flash-attn's MHA in H3's models). State: the KV cache and which cached
    keys are padding."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.softmax
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
        pad = pad_BT if pad_BT is not None else torch.zeros(B, T, dtype=torch.bool)
        state = {
            "k": cat_state(state, "k", k, 2),
            "v": cat_state(state, "v", v, 2),
            "pad": cat_state(state, "pad", pad.to(x_BTC.device), 1),
        }
        o = attend_cached(q, state["k"], state["v"], state["pad"])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state


# ----------------------------------------------------------------------------------------
# Letters of the linear-attention, SSM and routed families (below)
# ----------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------
# Letter L: lightning attention (TransNormerLLM)
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Letters B, W, C: Based's linear attention, sliding window, short convolution
# ----------------------------------------------------------------------------------------


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
        h, opts = config.hidden_size, config.based
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
        self.window = config.based.get("window", 64)
        self.block = max(self.window, 64)  # queries per block
        bias = config.softmax.get("bias", False)  # W shares letter A's options
        self.Wqkv = nn.Linear(h, 3 * h, bias=bias)
        self.out_proj = nn.Linear(h, h, bias=bias)
        opts = config.softmax
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
            )  # fmt: skip
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
        h, opts = config.hidden_size, config.based
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


# ----------------------------------------------------------------------------------------
# Letter M: mixture-of-head attention (MoH)
# ----------------------------------------------------------------------------------------


class _MoHRouter(nn.Module):
    """The learned routers of SkyworkAI/MoH's ViT/DiT attention, per token x:

        p        = softmax(routed x)                       over the R routed heads
        g_routed = k * renorm(p * topk_mask(p))            the top-k heads, summing to k
        g_shared = S * softmax(shared x)                   over the S shared heads
        alpha    = 2 * softmax(mix x)                      shared versus routed
        gates    = [alpha_0 * g_shared, alpha_1 * g_routed]

    so every active head's gate is 1 when the routers are uniform (MoH then equals
    multi-head attention). ``moh.gates: paper`` drops the factors k, S and 2. With one shared
    head its softmax would be the constant 1 (no ``shared`` weights); without shared heads
    there is no ``mix`` and the gates are k * renorm(...) alone. Computed in float32."""

    def __init__(self, hidden: int, shared: int, routed: int, top_k: int, scaled: bool):
        super().__init__()
        self.top_k, self.scaled = top_k, scaled
        self.routed = nn.Linear(hidden, routed, bias=False)
        self.shared = nn.Linear(hidden, shared, bias=False) if shared > 1 else None
        self.mix = nn.Linear(hidden, 2, bias=False) if shared else None
        self.num_shared = shared

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Gates [B, T, shared + routed], 0 on the routed heads a token did not select."""
        x = wide(x_BTC)

        def logits(layer: nn.Linear) -> torch.Tensor:
            return F.linear(x, layer.weight.to(x.dtype))

        p = F.softmax(logits(self.routed), dim=-1)
        top = p.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
        routed = p * mask
        routed = routed / routed.sum(-1, keepdim=True)
        k = self.top_k if self.scaled else 1
        if self.mix is None:
            return routed * k
        alpha = F.softmax(logits(self.mix), dim=-1) * (2 if self.scaled else 1)
        if self.shared is None:
            shared = torch.ones_like(alpha[..., :1])
        else:
            shared = F.softmax(logits(self.shared), dim=-1)
            shared = shared * (self.num_shared if self.scaled else 1)
        return torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed * k], dim=-1)


def _query_norm_gates(q_BHTD: torch.Tensor, shared: int, top_k: int) -> torch.Tensor:
    """MoH-LLaMA3's parameter-free router: gates [B, T, heads], 1 on the shared heads and on
    the top_k routed heads whose (pre-rotary) query has the largest L2 norm, 0 elsewhere (the
    release ranks softmax(norms / std(norms)), a monotone map of the norms, and keeps the
    top-k indicator only)."""
    norms = q_BHTD.detach().float().norm(dim=-1).transpose(1, 2)  # [B, T, heads]
    top = norms[..., shared:].topk(top_k, dim=-1).indices + shared
    gates = torch.zeros_like(norms).scatter_(-1, top, 1.0)
    gates[..., :shared] = 1.0
    return gates


class MoHAttention(nn.Module):
    """Letter M, mixture-of-head attention: LLaMA's attention (q, k, v, rotary, causal
    softmax, o_proj) whose output is a gated sum of heads,

        out_t = o_proj(concat_h(g_{t,h} * head_h(t))),

    heads 0 .. shared-1 always on, the routed ones on for the top-k of each token (gate 0
    elsewhere). ``moh.router: learned`` gives soft gates from the routers above;
    ``query_norm`` picks the routed heads by query norm with 0/1 gates. Like the released
    code, every head is computed and multiplied by its gate (plait skips the unselected
    queries instead: the same function). The balance loss is a training term and is not
    computed here.

    State: the KV cache of every head and which cached keys are padding. A routed head skips
    queries, not keys: any later token may select any head, so every head's keys stay. The
    gates depend only on the token itself, so a step needs nothing else. Padding keys are
    masked; a padding token's own gates only scale its own (ignored) output."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.moh
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.shared = opts.get("shared_heads", 2)
        self.top_k = opts.get("top_k", 2)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.rope_theta = config.rope_theta
        self.router = None
        if opts.get("router", "learned") == "learned":
            scaled = opts.get("gates", "released") == "released"
            routed = self.heads - self.shared
            self.router = _MoHRouter(h, self.shared, routed, self.top_k, scaled)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape

        def heads(t):
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_BTC)), heads(self.k_proj(x_BTC)), heads(self.v_proj(x_BTC))
        if self.router is None:
            gates_BTH = _query_norm_gates(q, self.shared, self.top_k)
        else:
            gates_BTH = self.router(x_BTC)
        cos, sin = rotary_cos_sin(positions_BT, self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        pad = pad_BT if pad_BT is not None else torch.zeros(B, T, dtype=torch.bool)
        state = {
            "k": cat_state(state, "k", k, 2),
            "v": cat_state(state, "v", v, 2),
            "pad": cat_state(state, "pad", pad.to(x_BTC.device), 1),
        }
        o = attend_cached(q, state["k"], state["v"], state["pad"])  # [B, H, T, D]
        o = o * gates_BTH.transpose(1, 2)[..., None].to(o.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state


# ----------------------------------------------------------------------------------------
# Letter H: H3
# ----------------------------------------------------------------------------------------


def _fft_causal_conv(u_BT_: torch.Tensor, k_L_: torch.Tensor) -> torch.Tensor:
    """y[:, t] = sum_{j <= t} k[t - j] u[:, j] along dim 1 of u (dim 0 of k; the trailing
    dims broadcast), by FFT over 2T points (no wrap-around for lags < T)."""
    T = u_BT_.shape[1]
    k = k_L_[:T]  # longer lags never reach these T outputs (and would wrap around)
    U = torch.fft.rfft(u_BT_, n=2 * T, dim=1)
    K = torch.fft.rfft(k, n=2 * T, dim=0)
    return torch.fft.irfft(U * K[None], n=2 * T, dim=1)[:, :T]


def _power_tables(z_HS: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z^l for l < L as two small tables, z^l = high[..., l // n] * low[..., l % n] with
    n = ceil(sqrt(L)): about 2 sqrt(L) complex exponentials per mode instead of L, and no
    [heads, N/2, L] tensor (a 1.3B layer at 2048 tokens: 2048 x 32 x 2048 complex)."""
    n = math.isqrt(max(L, 1) - 1) + 1
    m = -(-L // n)
    log_z = z_HS.log()  # any branch: only integer powers are taken
    l = torch.arange(max(n, m), device=z_HS.device, dtype=log_z.real.dtype)
    low = torch.exp(log_z[..., None] * l[:n])  # [H, S, n]
    high = torch.exp(log_z[..., None] * (n * l[:m]))  # [H, S, m]
    return low, high


class _Kernel(nn.Module):
    """A holder named like the release's ``SSKernel``, whose ``kernel`` is the actual one
    (so the parameters are ``kernel.kernel.*`` and ``ssm_k_kernel.kernel.*``)."""

    def __init__(self, kernel: nn.Module):
        super().__init__()
        self.kernel = kernel


class H3ShiftKernel(nn.Module):
    """The shift SSM (the release's ``SSKernelShift``): A shifts the state down by one,
    so the state is the last N inputs and the kernel is finite, N taps,
    K[l] = sum_n B[n] C[n + l] (the cross-correlation of B and C; B = e_1 gives K = C).
    B [d, N], C [1, d, N]: one kernel per channel."""

    def __init__(self, channels: int, N: int):
        super().__init__()
        self.B = nn.Parameter(torch.zeros(channels, N).index_fill_(1, torch.tensor([0]), 1.0))
        bound = 1 / math.sqrt(N)
        self.C = nn.Parameter(torch.empty(1, channels, N).uniform_(-bound, bound))

    def forward(self) -> torch.Tensor:
        """The taps [d, N] in float32 (lag 0 first)."""
        B, C = wide(self.B), wide(self.C[0])
        N = C.shape[1]
        windows = nn.functional.pad(C, (0, N - 1)).unfold(1, N, 1)  # [d, lag, n] = C[n + lag]
        return torch.einsum("dn,dln->dl", B, windows)


class H3DiagKernel(nn.Module):
    """The diagonal SSM (the release's ``SSKernelDiag``, S4D-Lin): per head, N/2 complex
    modes A = -exp(inv_A_real) + i A_imag (their conjugates are implied: the output is
    2 Re of the sum), step dt = exp(log_dt), B and C complex (stored as real pairs),
    discretised by

        bilinear:  A_bar = (1 + dt A / 2) / (1 - dt A / 2),  B_bar = dt B / (1 - dt A / 2)
        zoh:       A_bar = exp(dt A),                       B_bar = (exp(dt A) - 1) / A * B

    so that x_t = A_bar x_{t-1} + B_bar u_t, y_t = 2 Re(C . x_t), and as a convolution
    K[l] = 2 Re(sum_s C_s B_bar_s A_bar_s^l)."""

    def __init__(self, heads: int, N: int, discretisation: str):
        super().__init__()
        S = N // 2
        self.discretisation = discretisation
        self.log_dt = nn.Parameter(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.inv_A_real = nn.Parameter(torch.full((heads, S), math.log(0.5)))
        self.A_imag = nn.Parameter(
            (math.pi * torch.arange(S, dtype=torch.float32)).repeat(heads, 1)
        )
        self.B = nn.Parameter(torch.stack([torch.ones(heads, S), torch.zeros(heads, S)], -1))
        self.C = nn.Parameter(torch.randn(1, heads, S, 2) * math.sqrt(0.5))

    def discretised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_bar, B_bar, C), complex [heads, N/2], in float32 (complex64)."""
        dt = wide(self.log_dt).exp()[:, None]
        A = torch.complex(-wide(self.inv_A_real).exp(), wide(self.A_imag))
        B = torch.view_as_complex(wide(self.B).contiguous())
        C = torch.view_as_complex(wide(self.C[0]).contiguous())
        dtA = dt * A
        if self.discretisation == "zoh":
            return torch.exp(dtA), (torch.exp(dtA) - 1) / A * B, C
        if self.discretisation == "bilinear":
            return (1 + dtA / 2) / (1 - dtA / 2), dt / (1 - dtA / 2) * B, C
        raise ValueError(f"h3.discretisation: {self.discretisation!r} is not bilinear or zoh")

    def forward(self, L: int) -> torch.Tensor:
        """The convolution kernel [heads, L] (real, float32)."""
        A_bar, B_bar, C = self.discretised()
        low, high = _power_tables(A_bar, L)
        K = torch.einsum("hsa,hsb->hab", (C * B_bar)[..., None] * high, low)
        return 2 * K.flatten(1)[:, :L].real


class H3Mixer(nn.Module):
    """Letter H, the H3 layer (HazyResearch/H3's ``H3``):

        q, k, v = q_proj(x), k_proj(x), v_proj(x)          heads of ``head_dim`` channels
        k  = ShiftSSM(k) + ssm_k_D * k                     (a learned N-tap FIR per channel)
        kv = k v^T per head, [heads, d(k), d(v)]           (k * v at head_dim 1)
        y  = DiagSSM(kv) + D * kv                          (one S4D kernel per head)
        out = output_linear(sum over d(k) of q * y)        (channels ordered (d(v) heads))

    The shift SSM remembers the last few tokens, the diagonal SSM carries them far, and the
    q gate reads them out (associative recall). Everything after the projections runs in
    float32, as the release does.

    The full sequence is two FFT convolutions with the SSMs' kernels. Decoding keeps

      * ``k_tail`` [B, N - 1, hidden]: the last N - 1 inputs of the shift SSM (zeros before
        the sequence): its kernel has N taps, so no older k reaches a new output;
      * ``ssm`` [B, heads, d, d, N/2] complex: the diagonal SSM's state
        x = sum_j A_bar^(t - j) B_bar kv_j, which is all the infinite kernel needs of the
        past (x_t = A_bar x_{t-1} + B_bar kv_t, y_t = 2 Re(C . x_t));

    and steps both recurrences one token at a time. Left padding: k and v are zeroed there
    (their biases would make them nonzero), so a pad enters neither convolution nor state.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.h3
        self.N = opts.get("state_size", 64)
        self.head_dim = opts.get("head_dim", 1)
        self.heads = h // self.head_dim
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.output_linear = nn.Linear(h, h)
        self.ssm_k_kernel = _Kernel(H3ShiftKernel(h, self.N))
        self.ssm_k_D = nn.Parameter(torch.randn(h))
        self.kernel = _Kernel(
            H3DiagKernel(self.heads, self.N, opts.get("discretisation", "bilinear"))
        )
        self.D = nn.Parameter(torch.randn(self.heads))

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        q, k, v = wide(self.q_proj(x_BTC)), wide(self.k_proj(x_BTC)), wide(self.v_proj(x_BTC))
        if pad_BT is not None:
            real = (~pad_BT).to(k.dtype)[..., None]
            k, v = k * real, v * real
        if state is None:
            y, state = self._sequence(q, k, v)
        else:  # token by token (the SSMs' parameters discretised once)
            shift, ssm = self.ssm_k_kernel.kernel(), self.kernel.kernel.discretised()
            ys = []
            for t in range(T):
                y_t, state = self._step(q[:, t], k[:, t], v[:, t], state, shift, ssm)
                ys.append(y_t)
            y = torch.stack(ys, 1)
        return self.output_linear(y.to(x_BTC.dtype)), state

    def _readout(self, q_BHd: torch.Tensor, y_BHdd: torch.Tensor) -> torch.Tensor:
        """sum over d(k) of q * y, channels ordered (d(v) heads) as the release's Python path."""
        y = (q_BHd[..., None] * y_BHdd).sum(-2)  # [..., heads, d(v)]
        return y.transpose(-1, -2).flatten(-2)

    def _sequence(self, q, k, v) -> tuple[torch.Tensor, dict]:
        """The whole sequence from the start by FFT convolutions, and the state after it."""
        B, T, _ = q.shape
        H, d, N = self.heads, self.head_dim, self.N
        k_tail = torch.cat((k.new_zeros(B, N - 1, k.shape[2]), k), 1)[:, T:]
        shift = self.ssm_k_kernel.kernel()  # [hidden, N]
        k = _fft_causal_conv(k, shift.t()) + wide(self.ssm_k_D) * k
        kv = k.view(B, T, H, d, 1) * v.view(B, T, H, 1, d)
        ssm_kernel = self.kernel.kernel(T)  # [heads, T]
        y = _fft_causal_conv(kv, ssm_kernel.t()[:, :, None, None])
        y = y + wide(self.D)[:, None, None] * kv
        return self._readout(q.view(B, T, H, d), y), {"k_tail": k_tail, "ssm": self._state(kv)}

    def _state(self, kv_BTHdd: torch.Tensor) -> torch.Tensor:
        """The diagonal SSM's state after the sequence, sum_j A_bar^(T-1-j) B_bar kv_j."""
        A_bar, B_bar, _ = self.kernel.kernel.discretised()
        B, T = kv_BTHdd.shape[:2]
        low, high = _power_tables(A_bar, T)
        n, m = low.shape[-1], high.shape[-1]
        # u[r] = kv[T - 1 - r] (r = the power of A_bar it gets), r = n a + b
        u = nn.functional.pad(kv_BTHdd.flip(1), (0, 0, 0, 0, 0, 0, 0, n * m - T))
        u = u.view(B, m, n, *kv_BTHdd.shape[2:]).to(low.dtype)
        inner = torch.einsum("hsb,zabhxy->zahxys", low, u)
        return torch.einsum("hsa,zahxys->zhxys", high, inner) * B_bar[:, None, None]

    def _step(self, q_BC, k_BC, v_BC, state: dict, shift, ssm) -> tuple[torch.Tensor, dict]:
        """One token through both recurrences (``shift``: the shift SSM's taps [hidden, N],
        lag 0 first; ``ssm``: the diagonal SSM's (A_bar, B_bar, C))."""
        B = q_BC.shape[0]
        H, d = self.heads, self.head_dim
        window = torch.cat((state["k_tail"], k_BC[:, None]), 1)  # [B, N, hidden], oldest first
        k = torch.einsum("bnc,cn->bc", window, shift.flip(1)) + wide(self.ssm_k_D) * k_BC
        kv = k.view(B, H, d, 1) * v_BC.view(B, H, 1, d)
        A_bar, B_bar, C = ssm
        x = A_bar[:, None, None] * state["ssm"] + B_bar[:, None, None] * kv[..., None]
        y = 2 * (C[:, None, None] * x).sum(-1).real + wide(self.D)[:, None, None] * kv
        return self._readout(q_BC.view(B, H, d), y), {"k_tail": window[:, 1:], "ssm": x}


# ----------------------------------------------------------------------------------------
# Letter S: SeqBoat
# ----------------------------------------------------------------------------------------


def _ema_causal_conv(u_BTC: torch.Tensor, k_CL: torch.Tensor) -> torch.Tensor:
    """y[:, t] = sum_{j <= t} k[:, t - j] u[:, j] by FFT of size 2T (no wrap-around); taps
    beyond the kernel's length L are zero."""
    T = u_BTC.shape[1]
    k = F.pad(k_CL[:, :T], (0, max(T - k_CL.shape[1], 0)))
    U = torch.fft.rfft(u_BTC, n=2 * T, dim=1)
    K = torch.fft.rfft(k, n=2 * T, dim=1).t()[None]  # [1, T + 1, C]
    return torch.fft.irfft(U * K, n=2 * T, dim=1)[:, :T]


class _SeqBoatEMA(nn.Module):
    """Mega's multi-head damped EMA (the released ``move``), causal: per channel c and
    component n,

        h_t = (1 - p a) h_{t-1} + p b x_t,   y_t = sqrt(1/N) sum_n gamma_n h_t,n + omega x_t,

    with p = sigmoid(delta), a = sigmoid(alpha), b = beta, applied as a long convolution with
    kernel k[t] = sqrt(1/N) sum_n gamma_n p_n b_n (1 - p_n a_n)^t, cut after ``truncation``
    taps (0: never). State: truncated, the output reads only the last ``truncation`` inputs
    (a finite impulse response), so ``ema_tail`` keeps the last truncation - 1 of them;
    untruncated, ``ema_h`` [B, C, N] (float32) keeps h_n / (p_n b_n), i.e.
    sum_j decay_n^(t - j) x_j."""

    def __init__(self, dim: int, ndim: int, truncation: int):
        super().__init__()
        self.ndim, self.truncation = ndim, truncation
        self.delta = nn.Parameter(torch.zeros(dim, ndim, 1))
        self.alpha = nn.Parameter(torch.zeros(dim, ndim, 1))
        self.beta = nn.Parameter(torch.zeros(dim, ndim, 1))
        self.gamma = nn.Parameter(torch.zeros(dim, ndim))
        self.omega = nn.Parameter(torch.zeros(dim))

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w [C, N], log decay [C, N]): k[t] = sum_n w_n decay_n^t."""
        p = torch.sigmoid(wide(self.delta[..., 0]))
        decay = 1.0 - p * torch.sigmoid(wide(self.alpha[..., 0]))
        w = p * wide(self.beta[..., 0]) * wide(self.gamma) * math.sqrt(1.0 / self.ndim)
        return w, torch.log(decay)

    def kernel(self, L: int) -> torch.Tensor:
        """[C, L], built 256 lags at a time (no [C, N, L] tensor of powers)."""
        w, log_decay = self.coefficients()
        parts = []
        for s in range(0, L, 256):
            t = torch.arange(s, min(s + 256, L), device=w.device, dtype=w.dtype)
            parts.append(torch.einsum("cn,cnl->cl", w, torch.exp(log_decay[..., None] * t)))
        return torch.cat(parts, -1)

    def forward(self, x_BTC: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        x = wide(x_BTC)
        T = x.shape[1]
        if self.truncation:
            tail = state["ema_tail"] if state is not None else x[:, :0]
            u = torch.cat((tail, x), 1)
            y = _ema_causal_conv(u, self.kernel(min(self.truncation, u.shape[1])))
            y = y[:, tail.shape[1] :]
            state = {"ema_tail": u[:, max(u.shape[1] - (self.truncation - 1), 0) :]}
        else:
            w, log_decay = self.coefficients()
            y = _ema_causal_conv(x, self.kernel(T))
            h = x.new_zeros(x.shape[0], *w.shape)  # the new tokens' sum_j decay^(T-1-j) x_j
            for s in range(0, T, 256):
                lags = T - 1 - torch.arange(s, min(s + 256, T), device=x.device, dtype=x.dtype)
                powers = torch.exp(log_decay[..., None] * lags)  # [C, N, chunk]
                h = h + torch.einsum("btc,cnt->bcn", x[:, s : s + 256], powers)
            if state is not None:  # the past, decayed by 1 .. T more steps
                past = state["ema_h"]
                t = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)
                y = y + torch.einsum("bcn,cnt->btc", past * w, torch.exp(log_decay[..., None] * t))
                h = h + past * torch.exp(log_decay * T)
            state = {"ema_h": h}
        y = y + x * wide(self.omega)
        return y.to(x_BTC.dtype), state


class _SeqBoatRouter(nn.Module):
    """The released ``q_router`` (SMA's latent configurator): a softmax over two options
    at a learned temperature exp(temp)."""

    def __init__(self):
        super().__init__()
        self.temp = nn.Parameter(torch.zeros(1))

    def forward(self, logits_BT2: torch.Tensor) -> torch.Tensor:
        return F.softmax(logits_BT2 / self.temp.exp(), dim=-1)


def _rotary_interleaved(x_BTZ: torch.Tensor, positions_BT: torch.Tensor, theta: float):
    """The released rotary (complex form): channels (2i, 2i + 1) rotate together at
    frequency theta^(-2i / Z)."""
    cos, sin = rotary_cos_sin(positions_BT, x_BTZ.shape[-1], theta)
    cos, sin = cos[:, 0], sin[:, 0]  # [B, T, Z / 2]
    x = wide(x_BTZ).unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), -1)
    return out.flatten(-2).to(x_BTZ.dtype)


def _last_active(keys, values, known, keep: int) -> dict:
    """The last ``keep`` known entries of each row, in order, right-aligned; empty slots
    (a row with fewer) first, zeroed and not ``valid``."""
    B, S = known.shape
    order = torch.argsort(known.to(torch.int8), dim=1, stable=True)[:, S - keep :]
    valid = torch.arange(keep, device=known.device)[None] >= keep - known.sum(1, keepdim=True)

    def take(t):
        got = t.gather(1, order[..., None].expand(B, keep, t.shape[-1]))
        return got * valid[..., None].to(got.dtype)

    return {"k": take(keys), "v": take(values), "valid": valid}


class SeqBoatMixer(nn.Module):
    """Letter S, the released ``SeqBoatUnit`` as its LM runs it:

        mx = SiLU(EMA(x))
        [u | hx] = hx_proj(mx);  p = softmax(u / exp(temp))              the router (SMA)
        active = p_1 > p_0 (never a padding token);  g = p_1 on active tokens, else 0
        on each row's active tokens only, compressed in order, at their own positions:
          [z | r | v] = SiLU(mx_proj(mx))
          q, k = z * gamma[0] + beta[0], z * gamma[1] + beta[1]
          a = softmax(rope(q) rope(k)^T / sqrt(zdim)) v, where an active token sees itself
              and the window - 1 active tokens before it (a sliding window counted in
              active tokens)
          h = h_proj(r * a)
        out = SiLU(hx + g * h)    (h scattered back, 0 on inactive tokens)

    plait's block adds ``out`` to x (the released unit returns SiLU(x + hx + g h)).
    Inactive tokens skip the attention altogether, so its cost follows the active tokens.

    State: the EMA's (see ``_SeqBoatEMA``), and ``k`` [B, window - 1, zdim] (rotated),
    ``v`` [B, window - 1, hdim] (after SiLU), ``valid`` [B, window - 1]: each row's last
    window - 1 active tokens, right-aligned. Everything else is per token given mx, and an
    active token never sees an older active token than those. Left padding: padding tokens
    enter the EMA as zeros and are never active, so they touch neither the attention nor
    the state."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.seqboat
        self.zdim = opts.get("zdim", 64)
        self.hdim = opts.get("hdim", 0) or 2 * h
        self.window = opts.get("window", 1025)
        self.block = max(self.window, 64)  # queries per attention block
        self.router = opts.get("router", "learned")
        self.rope_theta = config.rope_theta
        bias = opts.get("bias", True)
        self.move = _SeqBoatEMA(h, opts.get("ema_dim", 16), opts.get("ema_truncation", 2048))
        self.mx_proj = nn.Linear(h, self.zdim + 2 * self.hdim, bias=bias)
        self.hx_proj = nn.Linear(h, 2 + h, bias=bias)
        self.h_proj = nn.Linear(self.hdim, h, bias=bias)
        self.gamma = nn.Parameter(torch.zeros(2, self.zdim))
        self.beta = nn.Parameter(torch.zeros(2, self.zdim))
        self.q_router = _SeqBoatRouter()

    def route(self, mx_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active [B, T], gate [B, T]). The logits are hx_proj's first two rows, in
        float32: the decision is an argmax (a tie goes to option 0, inactive)."""
        if self.router != "learned":
            active = torch.full(mx_BTC.shape[:2], self.router == "on", device=mx_BTC.device)
            return active, active.float()
        bias = self.hx_proj.bias
        u = F.linear(wide(mx_BTC), wide(self.hx_proj.weight[:2]),
                     None if bias is None else wide(bias[:2]))  # fmt: skip
        p = self.q_router(u)
        active = p[..., 1] > p[..., 0]
        return active, p[..., 1] * active

    def attend(self, q, keys, values, known, before):
        """Active queries q [B, n, Z] over keys [B, window - 1 + n, Z] / values (the cached
        slots, then the new active tokens), where ``known``. Query i is its row's
        (before + i)-th active token and sees the known keys whose rank among the row's
        active tokens is in (rank - window, rank]. The known entries are contiguous (the
        cache right-aligned, the new ones left-aligned), so query i's keys lie at indices
        i .. i + window - 1, and each block of queries needs only a slice of the keys."""
        n, W = q.shape[1], self.window - 1
        rank = known.long().cumsum(1) - 1
        outs = []
        for s in range(0, n, self.block):
            e = min(s + self.block, n)
            rq = (before[:, None] + torch.arange(s, e, device=q.device))[..., None]
            rk = rank[:, None, s : W + e]
            mask = known[:, None, s : W + e] & (rk <= rq) & (rk > rq - self.window)
            mask = mask | ~mask.any(-1, keepdim=True)  # padding queries: finite, dropped
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, s:e], keys[:, s : W + e], values[:, s : W + e], attn_mask=mask,
                    scale=1.0 / math.sqrt(self.zdim),
                )
            )  # fmt: skip
        return torch.cat(outs, 1)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        W = self.window - 1
        if pad_BT is not None:
            x_BTC = x_BTC * (~pad_BT)[..., None].to(x_BTC.dtype)
        mx, ema_state = self.move(x_BTC, state)
        mx = F.silu(mx)
        hx = self.hx_proj(mx)[..., 2:]
        active, g = self.route(mx)
        if pad_BT is not None:
            active, g = active & ~pad_BT, g * ~pad_BT
        if state is None:  # no active token yet: every cache slot empty
            state = {"k": mx.new_zeros(B, W, self.zdim), "v": mx.new_zeros(B, W, self.hdim),
                     "valid": torch.zeros(B, W, dtype=torch.bool, device=mx.device)}  # fmt: skip
        cache = {name: state[name] for name in ("k", "v", "valid")}
        counts = active.sum(1)
        n = int(counts.max())
        if n == 0:
            return F.silu(hx), {**ema_state, **cache}

        # compress: each row's active tokens first, in order; slots past its count are padding
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :n]
        valid = torch.arange(n, device=mx.device)[None] < counts[:, None]
        mxa = mx.gather(1, order[..., None].expand(B, n, mx.shape[-1]))
        z, r, v = F.silu(self.mx_proj(mxa)).split([self.zdim, self.hdim, self.hdim], -1)
        q = z * self.gamma[0].to(z.dtype) + self.beta[0].to(z.dtype)
        k = z * self.gamma[1].to(z.dtype) + self.beta[1].to(z.dtype)
        positions = positions_BT.gather(1, order)
        q = _rotary_interleaved(q, positions, self.rope_theta)
        k = _rotary_interleaved(k, positions, self.rope_theta)

        keys, values = torch.cat((cache["k"], k), 1), torch.cat((cache["v"], v), 1)
        known = torch.cat((cache["valid"], valid), 1)
        a = self.attend(q, keys, values, known, cache["valid"].sum(1))
        h = self.h_proj(r * a) * valid[..., None].to(hx.dtype)
        h = hx.new_zeros(hx.shape).scatter(1, order[..., None].expand_as(h), h)
        out = F.silu(hx + g[..., None].to(hx.dtype) * h)
        return out, {**ema_state, **_last_active(keys, values, known, W)}


MIXERS: dict[str, type[nn.Module]] = {
    "A": SoftmaxAttention,
    "L": LightningAttention,
    "B": BasedLinearAttention,
    "W": SlidingWindowAttention,
    "C": GatedShortConv,
    "M": MoHAttention,
    "H": H3Mixer,
    "S": SeqBoatMixer,
}
"""The token mixer of each pattern letter."""


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class PlaitCache:
    """Per-layer decode states for ``generate``: what each letter's ``forward`` returned, the
    number of positions seen (padding included) and, per row, of real tokens (the next
    rotary position)."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[dict | None] = [None] * num_layers
        self.seen = 0
        self.real_B: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows (beam search): every state tensor is batch-first."""
        for state in self.layers:
            if state is not None:
                for key, t in state.items():
                    state[key] = t.index_select(0, beam_idx.to(t.device))
        if self.real_B is not None:
            self.real_B = self.real_B.index_select(0, beam_idx.to(self.real_B.device))


class PlaitBlock(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) (no second half with ``mlp: none``)."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        letter = config.pattern[layer_idx]
        if letter not in MIXERS:
            raise ValueError(f"pattern letter {letter!r} (layer {layer_idx}) is not implemented")
        self.input_layernorm = make_norm(config)
        self.mixer = MIXERS[letter](config, layer_idx)
        if config.mlp != "none":
            self.post_attention_layernorm = make_norm(config)
            self.mlp = GeluMLP(config) if config.mlp == "gelu" else GatedMLP(config)
        else:
            self.mlp = None

    def forward(self, x, positions_BT, pad_BT, state):
        y, state = self.mixer(self.input_layernorm(x), positions_BT, pad_BT, state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, state


class PlaitPreTrainedModel(PreTrainedModel):
    config_class = PlaitConfig
    base_model_prefix = "model"
    _no_split_modules = ["PlaitBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(init_std) for projections and embeddings (only for weights a checkpoint
        lacks: an export holds every tensor)."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class PlaitModel(PlaitPreTrainedModel):
    def __init__(self, config: PlaitConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PlaitBlock(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.embed_multiplier = config.hidden_size**0.5 if config.embed_scale else 1.0
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: PlaitCache | None = None,
    ) -> tuple[torch.Tensor, PlaitCache]:
        """Hidden states [B, T, hidden] of T new tokens after the sequence in ``cache`` (None:
        a new one), and the cache after them. ``attention_mask`` (0 at padding, left or
        right) covers either the new tokens or the whole sequence so far."""
        B, T = input_ids.shape
        cache = cache if cache is not None else PlaitCache(len(self.layers))
        pad = None
        if attention_mask is not None and not bool(attention_mask[:, -T:].all()):
            pad = attention_mask[:, -T:] == 0
        real = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if pad is not None:
            real = (~pad).long()
        before = cache.real_B if cache.real_B is not None else real.new_zeros(B)
        positions = (before[:, None] + real.cumsum(1) - 1).clamp_min(0)
        x = self.embed_tokens(input_ids)
        if self.embed_multiplier != 1.0:
            x = x * self.embed_multiplier
        for i, layer in enumerate(self.layers):
            x, cache.layers[i] = layer(x, positions, pad, cache.layers[i])
        cache.seen += T
        cache.real_B = before + real.sum(1)
        return self.norm(x), cache


class PlaitForCausalLM(PlaitPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PlaitConfig):
        super().__init__(config)
        self.model = PlaitModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is PlaitCache, made by forward

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: PlaitCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of the new tokens; with ``labels`` (the inputs themselves, -100 where
        ignored) also the mean next-token cross entropy."""
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        hidden, cache = self.model(input_ids, attention_mask, past_key_values)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None
        )
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: PlaitCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """Only the tokens the cache has not seen go in (all of them at the first step)."""
        if past_key_values is not None and past_key_values.seen:
            input_ids = input_ids[:, past_key_values.seen :]
        inputs = {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values: PlaitCache, beam_idx: torch.LongTensor):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
