"""The hybrid layout: one letter per layer, each letter a registered token mixer.

Families add their letters here as they land (Based, H3, SeqBoat, MoH); any string of known
letters is a valid model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .mixers import LightningAttention, SoftmaxAttention


@dataclass(frozen=True)
class MixerSpec:
    description: str
    build: Callable[..., nn.Module]
    """(ModelConfig, ModelParallelConfig, layer_idx, SequenceParallel) -> module taking
    (x [B,T,C], positions [B,T], doc_ids [B,T] or None)."""


MIXERS: dict[str, MixerSpec] = {
    "L": MixerSpec("lightning linear attention with per-head decay", LightningAttention),
    "A": MixerSpec("causal softmax attention with RoPE", SoftmaxAttention),
}
