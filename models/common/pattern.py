"""The hybrid layout: one letter per layer, each letter a registered token mixer.

Any string of known letters is a valid model: every mixer maps x [B, T, hidden] to
[B, T, hidden] and is built from (ModelConfig, ModelParallelConfig, layer_idx,
SequenceParallel), so a Block can hold any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from torch import nn


@dataclass(frozen=True)
class MixerSpec:
    description: str
    build: Callable[..., nn.Module]
    """(ModelConfig, ModelParallelConfig, layer_idx, SequenceParallel) -> module taking
    (x [B,T,C], positions [B,T], doc_ids [B,T] or None); the class also has a static
    ``param_count(cfg)`` giving its logical parameter count from the config alone."""


@cache
def mixers() -> dict[str, MixerSpec]:
    """Letter -> mixer. Imported on first use: the family folders import models.common's
    layers, so an eager import here would be circular whichever module is imported first."""
    from plait.models.based.mixer import (
        BasedLinearAttention,
        GatedShortConv,
        SlidingWindowAttention,
    )
    from plait.models.h3.mixer import H3
    from plait.models.moh.mixer import MoHAttention
    from plait.models.seqboat.mixer import SeqBoat
    from plait.models.transnormer.mixer import LightningAttention

    from .mixers import SoftmaxAttention

    return {
        "L": MixerSpec(
            "lightning linear attention with decay (TransNormerLLM)", LightningAttention
        ),
        "A": MixerSpec("causal softmax attention with RoPE", SoftmaxAttention),
        "B": MixerSpec("Based Taylor linear attention", BasedLinearAttention),
        "W": MixerSpec(
            "sliding-window softmax attention with RoPE (Based)", SlidingWindowAttention
        ),
        "C": MixerSpec("gated short convolution (Based)", GatedShortConv),
        "H": MixerSpec("H3: shift and diagonal SSMs with multiplicative gates", H3),
        "S": MixerSpec("SeqBoat: EMA + router + GAU on the active tokens", SeqBoat),
        "M": MixerSpec("mixture-of-head attention (MoH)", MoHAttention),
    }
