"""Causal softmax attention (letter ``A``), the recall layer every hybrid family shares.

Takes x [B, T, hidden] and returns [B, T, hidden]. Heads are split across tensor-parallel
ranks through ``HeadProjections`` (fused q/k/v rows laid out head by head); the sequence-
parallel form (LASP-2H or Ring Attention) runs in the ``SequenceParallel`` context. ``A`` is
registered as the family "softmax" (``SOFTMAX``) by plait.models.registry like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import ModelParallelConfig
from torch import nn

from plait.parallel import softmax
from plait.parallel.sequence import SequenceParallel

from . import hf_export, tp_plan
from .config import ModelConfig, ModelConfigError
from .family import Family, Letter, LetterDoc
from .layers import HeadProjections, apply_rotary, attend_cached, rotary_cos_sin


@dataclass
class SoftmaxOptions:
    """Letter A (causal softmax attention): ``model.softmax.*``. The defaults are the
    LLaMA-style layer every family's presets use; H3's released checkpoints have biases and
    no positions in their attention layers (the H3 layers carry position), and the 2.7B
    rotates the first 64 dims of each 128-dim head."""

    bias: bool = False
    """Biases on the q/k/v and output projections (flash-attn's MHA in H3's models)."""
    rotary: bool = True
    """Rotary positions on q and k; false: no positional encoding in the attention layers."""
    rotary_dim: int = 0
    """How many leading dims of each head rotate (rotate-half pairs within them); 0 means
    the whole head."""

    def validate(self) -> None:
        if self.rotary_dim < 0 or self.rotary_dim % 2:
            raise ModelConfigError(
                f"softmax.rotary_dim: must be even and >= 0, got {self.rotary_dim}"
            )

    def check(self, cfg: ModelConfig) -> None:
        if self.rotary_dim > cfg.head_dim:
            raise ModelConfigError(
                f"softmax.rotary_dim: {self.rotary_dim} exceeds head_dim {cfg.head_dim}"
            )


class SoftmaxAttention(nn.Module):
    """Causal multi-head softmax attention with rotary positions (letter ``A``)."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        d, o = cfg.head_dim, cfg.softmax
        self.proj = HeadProjections(cfg, mp, cfg.num_heads, (d, d, d), d, bias=o.bias)
        self.rope_theta = cfg.rope_theta
        self.rotary_dim = (o.rotary_dim or d) if o.rotary else 0
        self.sp = sp

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        h = cfg.hidden_size
        return 4 * h * h + (4 * h if cfg.softmax.bias else 0)

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
        q, k, v = self.proj.split(x_BTC)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.proj.merge(self.attend(q, k, v, doc_ids_BT))

    def attend(self, q, k, v, doc_ids_BT):
        return softmax.attention(self.sp, q, k, v, doc_ids_BT)

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (the letter contract in family.py): the state is the KV cache."""
        q, k, v = self.proj.split(x_BTC)
        if self.rotary_dim:
            cos, sin = rotary_cos_sin(positions_BT, self.rotary_dim, self.rope_theta)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is None:
            return self.proj.merge(self.attend(q, k, v, None)), {"k": k, "v": v}
        k, v = torch.cat((state["k"], k), 2), torch.cat((state["v"], v), 2)
        return self.proj.merge(attend_cached(q, k, v)), {"k": k, "v": v}


class GroupedQueryAttention(nn.Module):
    """The forward and decode forms the released grouped-query attentions share (Qwen3.5's
    Q, Bamba's R). A subclass sets ``sp``, ``h`` and ``kv`` (this rank's query and key/value
    heads) and defines ``_qkv(x, positions) -> (q [B,h,T,D], k, v [B,kv,T,D], extra)`` with
    positions applied, and ``_out(o [B,h,T,D], extra) -> [B,T,hidden]``. Here the key/value
    heads are repeated over the query heads each serves (consecutive, the releases'
    repeat_kv), attention runs in the sequence-parallel context, and decoding keeps the KV
    cache of the key/value heads, not of their repeats."""

    sp: SequenceParallel
    h: int
    kv: int

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(self.h // self.kv, 1) if self.h != self.kv else t

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        q, k, v, extra = self._qkv(x_BTC, positions_BT)
        o = softmax.attention(self.sp, q, self._repeat(k), self._repeat(v), doc_ids_BT)
        return self._out(o, extra)

    def decode(self, x_BTC, positions_BT, state):
        """Decode form: the state is the KV cache of this rank's key/value heads."""
        q, k, v, extra = self._qkv(x_BTC, positions_BT)
        if state is None:
            o = softmax.attention(self.sp, q, self._repeat(k), self._repeat(v), None)
        else:
            k, v = torch.cat((state["k"], k), 2), torch.cat((state["v"], v), 2)
            o = attend_cached(q, self._repeat(k), self._repeat(v))
        return self._out(o, extra), {"k": k, "v": v}


def _mixing_flops(cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Scores and values of every head over (T + 1) / 2 keys on average (causal)."""
    return 2 * cfg.hidden_size * (seq_len + 1)


A = Letter(
    symbol="A",
    mixer=SoftmaxAttention,
    tp_plan=tp_plan.ATTENTION,
    hf_export=hf_export.ATTENTION,
    mixing_flops=_mixing_flops,
    zigzag=True,
    selective_recompute=True,
    doc=LetterDoc(
        description="causal softmax attention with RoPE",
        sequence_parallel=(
            "LASP-2H (all-gather K and V; bytes grow with the sequence) or Ring Attention (P2P "
            "ring, LSE merge), as parallel.softmax_sp says; ring attention in an all-softmax "
            "model uses the zigzag layout"
        ),
        decode_state="keys and values of every previous token (KV cache)",
        release=(
            "LLaMA's attention (HF transformers' LlamaAttention); with softmax.bias, rotary: "
            "false or rotary_dim, flash-attn's MHA as H3's released models use it"
        ),
        differs_from_release="none in function (no attention dropout: safari trains H3 with 0.1)",
    ),
)

SOFTMAX = Family(
    name="softmax",
    description="causal softmax attention, the recall layer every hybrid family shares",
    letters=(A,),
    options=SoftmaxOptions,
    hf_code=Path(__file__).with_name("hf_modeling") / "plait_layers.py",
)
