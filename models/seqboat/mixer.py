"""SeqBoat's token mixer, letter ``S``.

    mx = SiLU(EMA(x))                         multi-head damped EMA, per channel (Mega's)
    logits = W_r mx;  p = softmax(logits / tau)      tau learned
    active = p_1 > p_0;  g = p_1 on active tokens    (the SMA router)
    z = SiLU(W_z mx);  q, k = z * gamma + beta (two per-dim affines)
    v = SiLU(W_v x);  r = SiLU(W_rr mx);  hx = W_hx mx
    on the active tokens only, compressed (index = mask * cumsum(mask)) with their
    positions: local causal attention, window w (its own chunk and the previous one),
    rotary on the original positions;  h = W_h (r * attn v)
    scatter h back (zeros on inactive tokens), times g     (the router's gradient path)
    out = SiLU(hx + g * h)
The block adds ``out`` to the residual stream like every other letter (the paper's layer
folds the residual inside the SiLU; a uniform pre-norm residual lets any pattern mix S with
other letters). The attention cost scales with the number of active tokens.

Tensor parallelism: the EMA, router, z and hx paths are replicated or reduced to full width
(they are small, and the router must see every token's whole state); v, r and W_h are split
over the GAU's hdim. The single attention head's probabilities are then replicated work that
meets a sharded v, so z passes ``copy_to_tensor_model_parallel_region`` (all-reduce in
backward) and its gradient is complete and equal on every rank.

Sequence parallelism: the EMA is a long convolution over the whole sequence (the context's
gathered prefix); the compressed sequence's chunks cross rank borders at data-dependent
places, so the active tokens' keys and values are all-gathered and each rank attends over the
chunk before its first active token plus its own (``SequenceParallel.active_window``).
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

from plait.kernels.longconv import vandermonde
from plait.models.common.config import ModelConfig
from plait.models.common.family import Auxiliary
from plait.models.common.layers import apply_rotary, normal_init, output_init, rotary_cos_sin
from plait.parallel import convs, softmax
from plait.parallel.sequence import SequenceParallel


class MultiHeadEMA(nn.Module):
    """Mega's damped EMA, causal: per channel c and component n,
    h_t = (1 - p a) h_{t-1} + p b x_t,   y_t = sum_n gamma_n h_t,n * sqrt(1/N) + omega x_t,
    computed as a long convolution whose kernel is k[t] = sum_n gamma_n p_n b_n (1 - p_n a_n)^t.
    """

    def __init__(self, dim: int, ndim: int):
        super().__init__()
        self.ndim = ndim
        self.delta = nn.Parameter(torch.randn(dim, ndim) * 0.2)
        self.alpha = nn.Parameter(torch.randn(dim, ndim) * 0.2)
        beta = torch.ones(dim, ndim)
        beta[:, 1::2] = -1  # Mega's init: alternating signs, plus noise
        self.beta = nn.Parameter(beta + torch.randn(dim, ndim) * 0.02)
        self.gamma = nn.Parameter(torch.randn(dim, ndim))
        self.omega = nn.Parameter(torch.randn(dim))

    def kernel(self, L: int) -> torch.Tensor:
        p = torch.sigmoid(self.delta.float())
        decay = 1.0 - p * torch.sigmoid(self.alpha.float())  # (0, 1)
        w = p * self.beta.float() * self.gamma.float() * math.sqrt(1.0 / self.ndim)
        return vandermonde(w, torch.log(decay), L)  # chunked: no [C, N, L] tensor is kept

    def forward(self, x_BTC, doc_ids_BT, sp: SequenceParallel) -> torch.Tensor:
        T = x_BTC.shape[1] * sp.world  # the kernel spans the whole (global) sequence
        y = convs.long_conv(sp, x_BTC.float(), self.kernel(T), doc_ids_BT)
        return (y + x_BTC.float() * self.omega.float()).to(x_BTC.dtype)


def compress(mask_BT: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, n] of the active tokens in order (then padding), and the valid mask."""
    order = torch.argsort((~mask_BT).to(torch.int8), dim=1, stable=True)[:, :n]
    valid = torch.arange(n, device=mask_BT.device)[None] < mask_BT.sum(1, keepdim=True)
    return order, valid


def local_attention(q, k, v, docs, valid, window: int, scale: float):
    """Causal attention where query i sees keys in its own chunk of ``window`` (up to itself)
    and the whole previous chunk. q, k [B, n, Z], v [B, n, E]; O(n * window)."""
    B, n, _ = q.shape
    w = window
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
    allowed = (kidx[:, :, None, :] <= idx[..., None]) & kok[:, :, None, :] & ~first[:, :, None, :]
    allowed = allowed & (kdoc[:, :, None, :] == dc[..., None])
    allowed[..., w] |= ~allowed.any(-1)  # padding rows: attend to something, dropped later
    o = F.scaled_dot_product_attention(qc, kk, vv, attn_mask=allowed, scale=scale)
    return o.reshape(B, m * w, -1)[:, :n]


class SeqBoat(nn.Module):
    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        h, o = cfg.hidden_size, cfg.seqboat
        hdim, z = cfg.seqboat.value_dim(cfg.hidden_size), o.zdim
        self.ema = MultiHeadEMA(h, o.ema_dim)
        init, std = normal_init(cfg.init_std), cfg.init_std
        self.w_router = nn.Parameter(torch.randn(2, h) * std)
        self.log_tau = nn.Parameter(torch.zeros(1))  # 1-D: DeepSpeed cannot broadcast 0-d tensors
        self.w_z = nn.Parameter(torch.randn(z, h) * std)
        self.qk_gamma = nn.Parameter(torch.randn(2, z) * std + 1.0)
        self.qk_beta = nn.Parameter(torch.zeros(2, z))
        col = dict(config=mp, bias=False, gather_output=False, init_method=init)
        self.w_v = ColumnParallelLinear(h, hdim, **col)
        self.w_r = ColumnParallelLinear(h, hdim, **col)
        self.w_hx = RowParallelLinear(
            h, h, config=mp, bias=False, input_is_parallel=False, skip_bias_add=False,
            init_method=init,
        )  # fmt: skip
        self.w_h = RowParallelLinear(
            hdim, h, config=mp, bias=False, input_is_parallel=True, skip_bias_add=False,
            init_method=output_init(cfg),
        )  # fmt: skip
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
        hdim = cfg.seqboat.value_dim(cfg.hidden_size)
        ema = h * (4 * o.ema_dim + 1)
        return ema + 2 * h + 1 + o.zdim * h + 4 * o.zdim + 2 * h * hdim + h * h + hdim * h

    def gates(self, mx_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(active mask [B, T], gate [B, T]: p_1 where active, else 0)."""
        if self.router != "learned":
            on = self.router == "on"
            mask = torch.full(mx_BTC.shape[:2], on, dtype=torch.bool, device=mx_BTC.device)
            return mask, mask.to(torch.float32)
        logits = mx_BTC.float() @ self.w_router.float().t()
        p = F.softmax(logits / self.log_tau.exp(), dim=-1)
        mask = p[..., 1] > p[..., 0]
        return mask, p[..., 1] * mask

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

        xa, mxa = pick(x_BTC), pick(mx)
        z = F.silu(mxa @ self.w_z.to(mxa.dtype).t())
        z = copy_to_tensor_model_parallel_region(z)
        q = z * self.qk_gamma[0].to(z.dtype) + self.qk_beta[0].to(z.dtype)
        k = z * self.qk_gamma[1].to(z.dtype) + self.qk_beta[1].to(z.dtype)
        pos = pick(positions_BT)
        cos, sin = rotary_cos_sin(pos, q.shape[-1], self.rope_theta)
        q, k = apply_rotary(q[:, None], cos, sin)[:, 0], apply_rotary(k[:, None], cos, sin)[:, 0]
        v, _ = self.w_v(xa)
        r, _ = self.w_r(mxa)
        docs = pick(doc_ids_BT) if doc_ids_BT is not None else None
        scale = 1.0 / math.sqrt(q.shape[-1])

        def attend(q_, k_, v_, docs_, valid_):
            return local_attention(q_, k_, v_, docs_, valid_, self.window, scale)

        att = softmax.active_window(self.sp, attend, q, k, F.silu(v), docs, counts, self.window)
        h, _ = self.w_h(F.silu(r) * att)
        h = h * valid[..., None].to(h.dtype)
        full = hx.new_zeros(hx.shape).scatter(1, order[..., None].expand_as(h), h)
        return F.silu(hx + g[..., None].to(hx.dtype) * full)
