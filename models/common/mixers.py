"""The two token mixers of the skeleton: causal softmax attention and lightning attention.

Both take x [B, T, hidden] and return [B, T, hidden]. Heads are split across tensor-
parallel ranks: the fused input projection is a column-parallel layer whose output rows are
laid out head by head ([head, role, head_dim], role = q/k/v(/u)), so a contiguous TP split
hands each rank whole heads with all their roles; the output projection is row-parallel.
The HF export and checkpoint converters rely on that layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from plait.parallel.sequence import SequenceParallel

from .config import ModelConfig, ModelConfigError
from .layers import RMSNorm, apply_rotary, normal_init, output_init, rotary_cos_sin


def _local_heads(cfg: ModelConfig, mp: ModelParallelConfig) -> int:
    tp = mp.tensor_model_parallel_size
    if cfg.num_heads % tp:
        raise ModelConfigError(
            f"num_heads: {cfg.num_heads} heads cannot be split over tensor_parallel={tp} ranks"
        )
    return cfg.num_heads // tp


class _HeadProjections(nn.Module):
    """Fused column-parallel projection to ``roles`` tensors per head, plus the out projection."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, roles: int):
        super().__init__()
        self.roles = roles
        self.heads = _local_heads(cfg, mp)
        self.head_dim = cfg.head_dim
        self.in_proj = ColumnParallelLinear(
            cfg.hidden_size,
            roles * cfg.hidden_size,
            config=mp,
            bias=False,
            gather_output=False,
            init_method=normal_init(cfg.init_std),
        )
        self.out_proj = RowParallelLinear(
            cfg.hidden_size,
            cfg.hidden_size,
            config=mp,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            init_method=output_init(cfg),
        )

    def split(self, x_BTC: torch.Tensor) -> list[torch.Tensor]:
        """Project and return ``roles`` tensors [B, H_local, T, head_dim]."""
        y, _ = self.in_proj(x_BTC)
        B, T, _ = y.shape
        y = y.view(B, T, self.heads, self.roles, self.head_dim).permute(3, 0, 2, 1, 4)
        return list(y.unbind(0))

    def merge(self, o_BHTD: torch.Tensor) -> torch.Tensor:
        B, H, T, D = o_BHTD.shape
        out, _ = self.out_proj(o_BHTD.transpose(1, 2).reshape(B, T, H * D))
        return out


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with rotary positions (letter ``A``)."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        self.proj = _HeadProjections(cfg, mp, roles=3)
        self.rope_theta = cfg.rope_theta
        self.sp = sp

    def forward(
        self,
        x_BTC: torch.Tensor,
        positions_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.proj.split(x_BTC)
        cos, sin = rotary_cos_sin(positions_BT, q.shape[-1], self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj.merge(self.sp.attention(q, k, v, doc_ids_BT))


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


class LightningAttention(nn.Module):
    """Lightning linear attention with per-head decay (letter ``L``).

    x -> fused q, k, v, u projection -> SiLU(q), SiLU(k) -> causal decayed linear attention
    -> per-head SRMSNorm -> * u (output gate) -> out projection. The normalisation is per head
    (as in GroupNorm) so that a TP rank normalises its own heads without a collective; the
    faithful TransNormerLLM family (models issue) may choose otherwise.
    """

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        self.sp = sp
        self.proj = _HeadProjections(cfg, mp, roles=4)
        self.block = cfg.lightning_block
        self.out_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, learnable=False)
        slopes = transnormer_decay(cfg.num_heads, layer_idx, cfg.num_layers)
        h = self.proj.heads
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if h != cfg.num_heads else 0
        # Fixed by design, not learned; kept off the module's buffers so that a bf16 cast of
        # the model (DeepSpeed's) cannot round it: the kernel reads it in float32.
        self.slopes = slopes[tp_rank * h : (tp_rank + 1) * h].clone()

    def forward(
        self,
        x_BTC: torch.Tensor,
        positions_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v, u = self.proj.split(x_BTC)
        slopes = self.slopes.to(x_BTC.device)
        o = self.sp.lightning(F.silu(q), F.silu(k), v, slopes, doc_ids_BT, block=self.block)
        return self.proj.merge(self.out_norm(o) * u)
