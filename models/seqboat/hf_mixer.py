"""Letter S of a plait export: SeqBoat (an EMA, a router, local attention over the active
tokens only), the HF-side module of models/seqboat/mixer.py.

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .plait_layers import rotary_cos_sin, wide


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
        h, opts = config.hidden_size, config.options("seqboat")
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
                     None if bias is None else wide(bias[:2]))
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
            )
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
                     "valid": torch.zeros(B, W, dtype=torch.bool, device=mx.device)}
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
