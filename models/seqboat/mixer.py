"""SeqBoat's token mixer, letter ``S``: what the authors' released layer computes
(renll/SeqBoat's ``SeqBoatUnit``, causal, local, rotary, softmax; docs/fidelity/seqboat.md).

    mx = SiLU(EMA(x))                   multi-head damped EMA per channel (Mega's), the kernel
                                        cut at ``ema_truncation`` taps
    u = W_u mx + b_u;  p = softmax(u / tau)      2 logits, tau = exp(log_tau) learned
    active = p_1 > p_0;  g = p_1 on active tokens, else 0     (the SMA router)
    on the active tokens only, compressed in order (per row) with their original positions:
      z, r, v = SiLU(W_z mx + b_z), SiLU(W_r mx + b_r), SiLU(W_v mx + b_v)
      q, k = z * gamma_q + beta_q, z * gamma_k + beta_k          (per-dim affines)
      a = softmax attention of rope(q), rope(k), v, scale zdim^-1/2, where compressed query i
          sees keys i - window + 1 .. i (an exact sliding window over the active tokens)
      h = W_h (r * a) + b_h
    scatter h back (zeros on inactive tokens), times g     (the router's only gradient path)
    out = SiLU(W_hx mx + b_hx + g * h)

z, r and v all come from mx (the released ``mx_proj``), the router logits and hx from one
more projection of mx (``hx_proj``); every projection has a bias, zero at init, and every
weight starts as a normal of std init_std cut at +-2 std, W_h included (no depth scaling);
gamma starts the same way (not around 1) and beta at 0, so the attention starts near
uniform; tau starts at ``router_temperature`` * sqrt(hidden). plait's rotary rotates halves
where the released code rotates interleaved pairs: the same function up to a fixed
permutation of the zdim channels, which the HF export applies (hf_export.py).

Deliberate differences from the released layer:
- The residual is outside the SiLU: the block adds SiLU(hx + g h) to x, the released layer
  returns SiLU(x + hx + g h). A uniform pre-norm residual lets any pattern mix S with other
  letters.
- Compression is per row. The released layer skips compression for the whole batch when any
  row is fully active (the window then counts raw positions, inactive keys masked); the two
  agree at batch size 1, the released setting, and whenever no row is fully active.
- Packed documents: the EMA, the attention and the rotary positions restart at each document
  (the released code has no document boundaries).
- No dropout (the released enwik8 run uses 0.15 on mx, on hx + g h and on the embeddings).
- The model's final norm keeps its affine (the released one has none).
The attention cost scales with the number of active tokens.

Tensor parallelism: the EMA, router, z and hx paths are replicated or reduced to full width
(they are small, and the router must see every token's whole state); v, r and W_h are split
over the GAU's hdim. The single attention head's probabilities are then replicated work that
meets a sharded v, so z passes ``copy_to_tensor_model_parallel_region`` (all-reduce in
backward) and its gradient is complete and equal on every rank.

Sequence parallelism: the EMA is a long convolution over the whole sequence (a halo when the
truncated kernel fits in a rank's chunk, else the gathered prefix); the compressed sequence's
windows cross rank borders at data-dependent places, so the active tokens' keys and values
are all-gathered and each rank attends over the window-aligned chunk before its first active
token's chunk plus its own (``SequenceParallel.active_window``), a superset of every band.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_tensor_model_parallel_region,
)
from torch import nn

from plait.kernels.longconv import long_conv, vandermonde
from plait.models.common.config import ModelConfig
from plait.models.common.family import Auxiliary
from plait.models.common.layers import apply_rotary, rotary_cos_sin
from plait.parallel import convs, softmax
from plait.parallel.sequence import SequenceParallel


def trunc_normal_init(std: float):
    """The released init of every SeqBoat weight: a normal of ``std`` cut at +-2 std (drawn
    whole, so every TP size gets the same logical tensor)."""

    def init_(w: torch.Tensor) -> torch.Tensor:
        return nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)

    return init_


class MultiHeadEMA(nn.Module):
    """Mega's damped EMA, causal: per channel c and component n,
    h_t = (1 - p a) h_{t-1} + p b x_t,   y_t = sum_n gamma_n h_t,n * sqrt(1/N) + omega x_t,
    computed as a long convolution whose kernel is k[t] = sum_n gamma_n p_n b_n (1 - p_n a_n)^t
    for t < min(truncation, T) and zero beyond (``truncation`` 0: the whole length T).

    The truncation is the released LM's (2048 taps): past it the EMA forgets abruptly rather
    than geometrically, and a kernel shorter than a rank's chunk makes the sequence-parallel
    convolution a halo exchange instead of a gathered prefix. Inits as released: truncated
    normals (+-2 std) around Mega's values, delta and alpha std 0.2, beta std 0.02 plus
    +1, -1, +1, ... across the components, gamma and omega std 1.
    """

    def __init__(self, dim: int, ndim: int, truncation: int = 0):
        super().__init__()
        self.ndim, self.truncation = ndim, truncation

        def tn(std: float, *shape: int) -> torch.Tensor:
            return trunc_normal_init(std)(torch.empty(*shape))

        self.delta = nn.Parameter(tn(0.2, dim, ndim))
        self.alpha = nn.Parameter(tn(0.2, dim, ndim))
        sign = torch.ones(ndim)
        sign[1::2] = -1
        self.beta = nn.Parameter(tn(0.02, dim, ndim) + sign)
        self.gamma = nn.Parameter(tn(1.0, dim, ndim))
        self.omega = nn.Parameter(tn(1.0, dim))

    def kernel_length(self, T: int) -> int:
        """Taps of the kernel for a (global) sequence of T tokens."""
        return min(self.truncation, T) if self.truncation else T

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, log decay), both [C, N]: k[t] = sum_n w_n decay_n^t, decay in (0, 1)."""
        p = torch.sigmoid(self.delta.float())
        decay = 1.0 - p * torch.sigmoid(self.alpha.float())
        w = p * self.beta.float() * self.gamma.float() * math.sqrt(1.0 / self.ndim)
        return w, torch.log(decay)

    def kernel(self, L: int) -> torch.Tensor:
        return vandermonde(*self.coefficients(), L)  # chunked: no [C, N, L] tensor is kept

    def forward(self, x_BTC, doc_ids_BT, sp: SequenceParallel) -> torch.Tensor:
        # the kernel's length follows the whole (global) sequence, the same on every rank
        L = self.kernel_length(x_BTC.shape[1] * sp.world)
        y = convs.long_conv(sp, x_BTC.float(), self.kernel(L), doc_ids_BT)
        return (y + x_BTC.float() * self.omega.float()).to(x_BTC.dtype)

    def decode(self, x_BTC: torch.Tensor, state: dict | None) -> tuple[torch.Tensor, dict]:
        """The EMA of T new tokens continued from ``state`` (one sequence per row, one rank).

        Truncated to L taps, the output at t reads x_{t-L+1} .. x_t and nothing older (a finite
        impulse response), so the last L - 1 inputs are the whole state: ``ema_tail``
        [B, <= L - 1, C] (shorter until L - 1 tokens were seen), and the new outputs are the
        convolution of tail + new inputs, of which the tail's own outputs are dropped.
        Untruncated, the kernel sum_n w_n decay_n^l is a sum of geometric series, so
        ``ema_h`` [B, C, N] (float32), h_n = sum_{j <= t} decay_n^(t - j) x_j, is enough:
        the past adds sum_n w_n decay_n^(i + 1) h_n to the i-th new output."""
        x = x_BTC.float()
        if self.truncation:
            tail = state["ema_tail"] if state else x_BTC[:, :0]
            u = torch.cat((tail, x_BTC), 1)
            k = self.kernel(self.kernel_length(u.shape[1]))
            y = long_conv(u.float(), k)[:, tail.shape[1] :]
            state = {"ema_tail": u[:, max(u.shape[1] - self.truncation + 1, 0) :]}
        else:
            w, log_decay = self.coefficients()
            T = x.shape[1]
            y = long_conv(x, self.kernel(T))
            h = _geometric_sum(x, log_decay)  # the new tokens' own contribution
            if state is not None:
                past = state["ema_h"]
                t = torch.arange(1, T + 1, device=x.device, dtype=torch.float32)
                powers = torch.exp(log_decay[..., None] * t)  # [C, N, T]: decay^(i + 1)
                y = y + torch.einsum("bcn,cnt->btc", past * w, powers)
                h = h + past * torch.exp(log_decay * T)
            state = {"ema_h": h}
        return (y + x * self.omega.float()).to(x_BTC.dtype), state


def _geometric_sum(x_BTC: torch.Tensor, log_decay_CN: torch.Tensor, chunk: int = 256):
    """[B, C, N]: sum_j decay^(T - 1 - j) x_j, a few lags at a time (no [C, N, T] tensor)."""
    B, T, C = x_BTC.shape
    h = x_BTC.new_zeros(B, C, log_decay_CN.shape[1])
    for start in range(0, T, chunk):
        lags = T - 1 - torch.arange(start, min(start + chunk, T), device=x_BTC.device)
        powers = torch.exp(log_decay_CN[..., None] * lags.to(log_decay_CN.dtype))
        h = h + torch.einsum("btc,cnt->bcn", x_BTC[:, start : start + chunk], powers)
    return h


def compress(mask_BT: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, n] of the active tokens in order (then padding), and the valid mask."""
    order = torch.argsort((~mask_BT).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=mask_BT.device)[None] < mask_BT.sum(1, keepdim=True)
    return order, valid


def local_attention(q, k, v, docs, valid, window: int, scale: float):
    """Causal sliding-window attention: query i sees keys j with i - window < j <= i (same
    document, valid), exactly ``window`` keys including itself away from the start.
    q, k [B, n, Z], v [B, n, E]; O(n * window).

    Laid out in chunks of ``window`` (fewer when the whole sequence is shorter), each next
    to the one before it, so that every key a query may see is in its own chunk or the
    previous one; the band condition then trims the previous chunk to the exact window."""
    B, n, _ = q.shape
    w = min(window, n)  # one chunk holds the whole band when n <= window
    m = -(-n // w)
    pad = m * w - n

    def chunks(x, fill=0):
        x = F.pad(x, (0, 0, 0, pad), value=fill) if x.dim() == 3 else F.pad(x, (0, pad), value=fill)
        return x.view(B, m, w, *x.shape[2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    idx = torch.arange(m * w, device=q.device).view(1, m, w).expand(B, m, w)
    ok = chunks(valid.to(torch.long)).bool()
    if docs is None:
        docs = torch.zeros(B, n, dtype=torch.long, device=q.device)
    dc = chunks(docs, fill=-1)

    def with_prev(x):  # [B, m, w, ...] -> [B, m, 2w, ...]: previous chunk then this one
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return torch.cat([prev, x], dim=2)

    kk, vv = with_prev(kc), with_prev(vc)
    kidx, kok, kdoc = with_prev(idx), with_prev(ok), with_prev(dc)
    first = torch.zeros(B, m, 2 * w, dtype=torch.bool, device=q.device)
    first[:, 0, :w] = True  # chunk 0 has no previous chunk
    qi, kj = idx[..., None], kidx[:, :, None, :]
    allowed = (kj <= qi) & (kj > qi - window) & kok[:, :, None, :] & ~first[:, :, None, :]
    allowed = allowed & (kdoc[:, :, None, :] == dc[..., None])
    allowed[..., w] |= ~allowed.any(-1)  # padding rows: attend to something, dropped later
    o = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=allowed, scale=scale)
    return o.reshape(B, m * w, -1)[:, :n]


class SeqBoat(nn.Module):
    """The S letter (see the module docstring for the function and what differs from the
    released layer)."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        h, o = cfg.hidden_size, cfg.seqboat
        hdim, z = o.value_dim(h), o.zdim
        init = trunc_normal_init(cfg.init_std)
        self.ema = MultiHeadEMA(h, o.ema_dim, o.ema_truncation)
        # the router's logits are rows 0-1 of the released hx_proj; kept apart because the
        # router must see whole tokens (replicated) while W_hx is row-parallel
        self.w_router = nn.Parameter(init(torch.empty(2, h)))
        self.b_router = nn.Parameter(torch.zeros(2)) if o.bias else None
        tau0 = math.log(o.router_temperature * math.sqrt(h))
        self.log_tau = nn.Parameter(torch.full((1,), tau0))  # 1-D: DeepSpeed cannot broadcast 0-d
        self.w_z = nn.Parameter(init(torch.empty(z, h)))
        self.b_z = nn.Parameter(torch.zeros(z)) if o.bias else None
        # not centred on 1: q.k starts ~init_std^2 small and the attention near uniform
        self.qk_gamma = nn.Parameter(init(torch.empty(2, z)))
        self.qk_beta = nn.Parameter(torch.zeros(2, z))
        col = dict(config=mp, bias=o.bias, gather_output=False, init_method=init)
        self.w_v = ColumnParallelLinear(h, hdim, **col)
        self.w_r = ColumnParallelLinear(h, hdim, **col)
        row = dict(config=mp, bias=o.bias, skip_bias_add=False, init_method=init)
        self.w_hx = RowParallelLinear(h, h, input_is_parallel=False, **row)
        self.w_h = RowParallelLinear(hdim, h, input_is_parallel=True, **row)  # no depth scaling
        self.window, self.router, self.rope_theta = o.window, o.router, cfg.rope_theta
        self.sp = sp
        self.active_fraction: torch.Tensor | None = None

    def auxiliary(self) -> list[Auxiliary]:
        """The fraction of tokens the router activated (a gauge, not a loss)."""
        if self.active_fraction is None:
            return []
        return [Auxiliary("seqboat_active", self.active_fraction)]

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        h, o = cfg.hidden_size, cfg.seqboat
        hdim, z, b = o.value_dim(h), o.zdim, int(o.bias)
        ema = h * (4 * o.ema_dim + 1)
        router = 2 * h + 2 * b + 1
        qk = z * h + z * b + 4 * z
        v_r = 2 * (h * hdim + hdim * b)
        return ema + router + qk + v_r + (h * h + h * b) + (hdim * h + h * b)

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.seqboat.hdim": cfg.seqboat.value_dim(cfg.hidden_size),
                "model.hidden_size": cfg.hidden_size}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0  # the EMA and the local window run on gathered or prefix tokens

    def gates(self, mx_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active mask [B, T], gate [B, T]: p_1 where active, else 0)."""
        if self.router != "learned":
            on = self.router == "on"
            mask = torch.full(mx_BTC.shape[:2], on, dtype=torch.bool, device=mx_BTC.device)
            return mask, mask.to(torch.float32)
        bias = self.b_router.float() if self.b_router is not None else None
        logits = F.linear(mx_BTC.float(), self.w_router.float(), bias)
        p = F.softmax(logits / self.log_tau.exp(), dim=-1)
        mask = p[..., 1] > p[..., 0]  # argmax; a tie goes to option 0, as torch.max does
        return mask, p[..., 1] * mask

    def project(self, mxa: torch.Tensor, positions: torch.Tensor):
        """q, k (rotated at the tokens' own positions), SiLU(v) and SiLU(r) of the active
        tokens' mx [B, n, hidden] (v and r: this rank's hdim channels)."""
        b_z = self.b_z.to(mxa.dtype) if self.b_z is not None else None
        z = F.silu(F.linear(mxa, self.w_z.to(mxa.dtype), b_z))
        z = copy_to_tensor_model_parallel_region(z)
        q = z * self.qk_gamma[0].to(z.dtype) + self.qk_beta[0].to(z.dtype)
        k = z * self.qk_gamma[1].to(z.dtype) + self.qk_beta[1].to(z.dtype)
        cos, sin = rotary_cos_sin(positions, q.shape[-1], self.rope_theta)
        q, k = apply_rotary(q[:, None], cos, sin)[:, 0], apply_rotary(k[:, None], cos, sin)[:, 0]
        v, _ = self.w_v(mxa)
        r, _ = self.w_r(mxa)
        return q, k, F.silu(v), F.silu(r)

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        mx = F.silu(self.ema(x_BTC, doc_ids_BT, self.sp))
        hx, _ = self.w_hx(mx)
        mask, g = self.gates(mx)
        self.active_fraction = mask.float().mean().detach()
        counts = mask.sum(1)
        n = int(counts.max())
        if n == 0 and self.sp.world == 1:
            return F.silu(hx)
        n = max(n, 1)  # under SP every rank joins the gathers, active tokens or not
        order, valid = compress(mask, n)
        B = x_BTC.shape[0]

        def pick(t):  # [B, T, ...] -> the active tokens [B, n, ...]
            return t.gather(1, order.view(B, n, *[1] * (t.dim() - 2)).expand(B, n, *t.shape[2:]))

        q, k, v, r = self.project(pick(mx), pick(positions_BT))
        docs = pick(doc_ids_BT) if doc_ids_BT is not None else None
        scale = 1.0 / math.sqrt(q.shape[-1])

        def attend(q_, k_, v_, docs_, valid_):
            return local_attention(q_, k_, v_, docs_, valid_, self.window, scale)

        att = softmax.active_window(self.sp, attend, q, k, v, docs, counts, self.window)
        h, _ = self.w_h(r * att)
        h = h * valid[..., None].to(h.dtype)
        full = hx.new_zeros(hx.shape).scatter(1, order[..., None].expand_as(h), h)
        return F.silu(hx + g[..., None].to(hx.dtype) * full)

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (the letter contract in family.py). The state holds:

        - the EMA's (``MultiHeadEMA.decode``): the last ema_truncation - 1 inputs, or the
          [hidden, ema_dim] recurrence state when untruncated. mx depends on nothing else,
          and the router, z, r, v and hx are per-token functions of mx;
        - ``k`` [B, window - 1, zdim], ``v`` [B, window - 1, hdim on this rank] and
          ``valid`` [B, window - 1]: the rotated keys and SiLU'd values of the row's last
          window - 1 active tokens, right-aligned (``valid`` marks the filled slots while a
          row has had fewer): an active query sees exactly those and itself, counted in
          active tokens, so older ones are never read again.

        Inactive tokens skip the attention and give SiLU(hx), as in ``forward``. With no
        state the new tokens take forward's path (compressed local attention); after a
        state the new active queries attend over the cached keys and their own, banded by
        their rank among the row's active tokens."""
        B, W = x_BTC.shape[0], self.window - 1
        mx_pre, ema_state = self.ema.decode(x_BTC, state)
        mx = F.silu(mx_pre)
        hx, _ = self.w_hx(mx)
        mask, g = self.gates(mx)
        first = state is None
        if first:  # no active token seen yet: every slot empty
            z, e = self.w_z.shape[0], self.w_v.output_size_per_partition
            state = {"k": mx.new_zeros(B, W, z), "v": mx.new_zeros(B, W, e),
                     "valid": torch.zeros(B, W, dtype=torch.bool, device=mx.device)}
        kv = {name: state[name] for name in ("k", "v", "valid")}
        counts = mask.sum(1)
        n = int(counts.max())
        if n == 0:
            return F.silu(hx), {**ema_state, **kv}
        order, valid = compress(mask, n)

        def pick(t):  # [B, T, ...] -> the active tokens [B, n, ...]
            return t.gather(1, order.view(B, n, *[1] * (t.dim() - 2)).expand(B, n, *t.shape[2:]))

        q, k, v, r = self.project(pick(mx), pick(positions_BT))
        scale = 1.0 / math.sqrt(q.shape[-1])
        keys, values = torch.cat((kv["k"], k), 1), torch.cat((kv["v"], v), 1)
        known = torch.cat((kv["valid"], valid), 1)
        if first:
            att = local_attention(q, k, v, None, valid, self.window, scale)
        else:
            att = _attend_after(q, keys, values, known, kv["valid"].sum(1), self.window, scale)
        h, _ = self.w_h(r * att)
        h = h * valid[..., None].to(h.dtype)
        full = hx.new_zeros(hx.shape).scatter(1, order[..., None].expand_as(h), h)
        y = F.silu(hx + g[..., None].to(hx.dtype) * full)
        return y, {**ema_state, **_last_active(keys, values, known, W)}


def _attend_after(q, keys, values, known, before, window: int, scale: float):
    """Active queries q [B, n, Z] (the i-th is the row's (before + i)-th active token) over
    keys [B, S, Z] / values where ``known``, each seeing the keys whose rank among the row's
    active tokens is within ``window`` up to its own (the band of ``local_attention``)."""
    rank_k = known.long().cumsum(1) - 1  # [B, S]
    rank_q = before[:, None] + torch.arange(q.shape[1], device=q.device)  # [B, n]
    rk, rq = rank_k[:, None, :], rank_q[..., None]
    allowed = known[:, None, :] & (rk <= rq) & (rk > rq - window)
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # padding queries: finite, dropped
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, scale=scale)


def _last_active(keys, values, known, W: int) -> dict:
    """The decode state's k, v, valid: the last W known entries of each row, in order,
    right-aligned (empty slots first, zeroed)."""
    B, S = known.shape
    order = torch.argsort(known.to(torch.int8), dim=1, stable=True)[:, S - W :]  # known last
    valid = torch.arange(W, device=known.device)[None] >= W - known.sum(1, keepdim=True)

    def take(t):
        got = t.gather(1, order[..., None].expand(B, W, t.shape[-1]))
        return got * valid[..., None].to(got.dtype)

    return {"k": take(keys), "v": take(values), "valid": valid}
