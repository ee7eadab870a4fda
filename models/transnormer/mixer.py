"""TransNormerLLM's token mixer, letter ``L``: lightning attention with per-layer decay.

From the released modeling code: x -> one projection to q, k, v, u -> SiLU(q), SiLU(k) ->
optional LRPE on q and k -> causal linear attention with decay -> SRMSNorm(o) * u -> out
projection. The decay is fixed (not learned), per head and per layer (``transnormer_decay``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from torch import nn

from plait.kernels.lightning import lightning_attention, lightning_attention_step
from plait.models.common.config import ModelConfig
from plait.models.common.layers import FullWidthSRMSNorm, HeadProjections, RMSNorm
from plait.parallel import lasp2
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import mark_tp_sharded


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's head slopes 2^(-8(h+1)/n); for n not a power of two, the slopes of the nearest
    lower power of two followed by every other slope of the next higher one."""

    def pow2(m: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / m) for h in range(m)]

    if n & (n - 1) == 0:
        return pow2(n)
    lower = 2 ** math.floor(math.log2(n))
    return pow2(lower) + pow2(2 * lower)[0::2][: n - lower]


def transnormer_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates s (lambda = exp(-s)) of TransNormerLLM for one layer.

    s_h = slope_h * (1 - l / (L - 1) + 1e-5): lower layers decay fast (local mixing), the
    top layer barely decays (global mixing), which is why the schedule is per layer.
    """
    depth = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0
    return torch.tensor(alibi_slopes(num_heads), dtype=torch.float32) * depth


class Lrpe(nn.Module):
    """Linearised relative positional encoding: x -> [x cos(theta n), x sin(theta n)].

    Since cos(a)cos(b) + sin(a)sin(b) = cos(a - b), q_n . k_m then depends on n - m only, which
    linear attention (no score matrix to add a bias to) can carry. theta is learned, one value
    per (head, channel), initialised like rotary frequencies over the full width.
    """

    def __init__(self, num_heads: int, head_dim: int, local: int, first: int):
        super().__init__()
        d = num_heads * head_dim
        theta = 10000.0 ** (-2.0 / d * torch.arange(d, dtype=torch.float32))
        theta = theta.view(num_heads, 1, head_dim)[first : first + local].clone()
        self.theta = mark_tp_sharded(nn.Parameter(theta), 0)

    def forward(self, x_BHTD: torch.Tensor, positions_BT: torch.Tensor) -> torch.Tensor:
        angles = self.theta.float()[None] * positions_BT.float()[:, None, :, None]
        xf = x_BHTD.float()
        return torch.cat([xf * angles.cos(), xf * angles.sin()], dim=-1).to(x_BHTD.dtype)


class LightningAttention(nn.Module):
    """Lightning linear attention with TransNormerLLM's decay (letter ``L``).

    ``cfg.lightning_norm``: "full" normalises o over the whole width as the paper does (an
    all-reduce of one number per token under TP); "head" normalises each head alone (no
    collective; what the skeleton used).
    """

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        self.sp = sp
        d = cfg.head_dim
        self.proj = HeadProjections(cfg, mp, cfg.num_heads, (d, d, d, d), d)
        h, first = self.proj.heads, self.proj.first_head
        self.block = cfg.lightning_block
        self.lrpe = Lrpe(cfg.num_heads, d, h, first) if self.has_lrpe(cfg, layer_idx) else None
        if cfg.lightning_norm == "full":
            self.out_norm = FullWidthSRMSNorm(cfg.hidden_size, cfg.norm_eps)
        else:
            self.out_norm = RMSNorm(d, cfg.norm_eps, learnable=False)
        self.full_norm = cfg.lightning_norm == "full"
        slopes = transnormer_decay(cfg.num_heads, layer_idx, cfg.num_layers)
        # Fixed by design, not learned; kept off the module's buffers so that a bf16 cast of
        # the model (DeepSpeed's) cannot round it: the kernel reads it in float32.
        self.slopes = slopes[first : first + h].clone()

    @staticmethod
    def has_lrpe(cfg: ModelConfig, layer_idx: int) -> bool:
        return cfg.lrpe == "all" or (cfg.lrpe == "first" and layer_idx == cfg.pattern.index("L"))

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        lrpe = LightningAttention.has_lrpe(cfg, layer_idx)
        return 5 * cfg.hidden_size**2 + (cfg.hidden_size if lrpe else 0)

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.num_heads": cfg.num_heads}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0

    def forward(
        self,
        x_BTC: torch.Tensor,
        positions_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v, u = self._qkvu(x_BTC, positions_BT)
        slopes = self.slopes.to(x_BTC.device)
        o = lasp2.lightning(self.sp, q, k, v, slopes, doc_ids_BT, block=self.block)
        return self._out(o, u)

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (the letter contract in family.py).

        The state is ``{"kv": [B, H_local, D, d]}`` in float32 (D = 2d with LRPE): the decayed
        sum S_t = sum_{j <= t} lambda^(t - j) k_j^T v_j. It is enough because every output is
        q_t S_t and S_{t+1} = lambda S_t + k_{t+1}^T v_{t+1}; LRPE needs only the absolute
        positions, which come with the tokens, and the output norm and gate are per token.
        A prefill or a chunk is one chunked kernel call continuing from the state (exact: the
        kernel does not pad its last block); a single token is one step of the recurrence.
        The sequence is not split across context-parallel ranks here, so the plain kernel
        (not LASP-2) is used.
        """
        q, k, v, u = self._qkvu(x_BTC, positions_BT)
        slopes = self.slopes.to(x_BTC.device)
        S = state["kv"] if state is not None else None
        if S is not None and q.shape[2] == 1:
            o, S = lightning_attention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], slopes, S)
            o = o[:, :, None]
        else:
            o, S = lightning_attention(
                q, k, v, slopes, initial_state=S, return_state=True, block=self.block
            )
        return self._out(o, u), {"kv": S}

    def _qkvu(self, x_BTC: torch.Tensor, positions_BT: torch.Tensor) -> list[torch.Tensor]:
        """q, k (SiLU, then LRPE where the layer has it), v, u, each [B, H_local, T, .]."""
        q, k, v, u = self.proj.split(x_BTC)
        q, k = F.silu(q), F.silu(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions_BT), self.lrpe(k, positions_BT)
        return [q, k, v, u]

    def _out(self, o_BHTD: torch.Tensor, u_BHTD: torch.Tensor) -> torch.Tensor:
        """SRMSNorm(o) * u, then the out projection (the norm over the full width or per head)."""
        if not self.full_norm:
            return self.proj.merge(self.out_norm(o_BHTD) * u_BHTD)
        B, H, T, D = o_BHTD.shape
        o = self.out_norm(o_BHTD.transpose(1, 2).reshape(B, T, H * D))
        out, _ = self.proj.out_proj(o * u_BHTD.transpose(1, 2).reshape(B, T, H * D))
        return out
