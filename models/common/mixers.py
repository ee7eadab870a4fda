"""Causal softmax attention (letter ``A``), the recall layer every hybrid family shares.

Takes x [B, T, hidden] and returns [B, T, hidden]. Heads are split across tensor-parallel
ranks through ``HeadProjections`` (fused q/k/v rows laid out head by head); the sequence-
parallel form (LASP-2H or Ring Attention) runs in the ``SequenceParallel`` context. ``A`` is
registered as the family "softmax" (``SOFTMAX``) by plait.models.registry like any other.
"""

from __future__ import annotations

import torch
from megatron.core import ModelParallelConfig
from torch import nn

from plait.parallel import softmax
from plait.parallel.sequence import SequenceParallel

from . import hf_export, tp_plan
from .config import ModelConfig
from .family import Family, Letter, SequenceParallelForm
from .layers import HeadProjections, apply_rotary, rotary_cos_sin


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with rotary positions (letter ``A``)."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        d = cfg.head_dim
        self.proj = HeadProjections(cfg, mp, cfg.num_heads, (d, d, d), d)
        self.rope_theta = cfg.rope_theta
        self.sp = sp

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        return 4 * cfg.hidden_size**2

    def forward(
        self,
        x_BTC: torch.Tensor,
        positions_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.proj.split(x_BTC)
        cos, sin = rotary_cos_sin(positions_BT, q.shape[-1], self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj.merge(self.attend(q, k, v, doc_ids_BT))

    def attend(self, q, k, v, doc_ids_BT):
        return softmax.attention(self.sp, q, k, v, doc_ids_BT)


def _mixing_flops(cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Scores and values of every head over (T + 1) / 2 keys on average (causal)."""
    return 2 * cfg.hidden_size * (seq_len + 1)


A = Letter(
    symbol="A",
    description="causal softmax attention with RoPE",
    mixer=SoftmaxAttention,
    tp_plan=tp_plan.ATTENTION,
    hf_export=hf_export.ATTENTION,
    mixing_flops=_mixing_flops,
    sequence_parallel=SequenceParallelForm(
        "LASP-2H (all-gather K and V; bytes grow with the sequence) or Ring Attention "
        "(P2P ring, LSE merge), as parallel.softmax_sp says; ring attention in an all-softmax "
        "model uses the zigzag layout",
        (softmax.attention,),
        zigzag=True,
    ),
    decode_state="keys and values of every previous token (KV cache)",
)

SOFTMAX = Family(
    name="softmax",
    description="causal softmax attention, the recall layer every hybrid family shares",
    letters=(A,),
)
