"""H3 hybrid presets: the released checkpoints (HazyResearch/H3's README and
examples/generate_text_h3.py) and a tiny CPU one.

Released layout: GPT-2 blocks (LayerNorm eps 1e-5 with bias, GELU MLP of 4d with biases), H3
layers with head_dim 1, state 64 and the bilinear S4D kernel, softmax attention at layers
[6] (125M), [8, 16] (355M, 1.3B), [10, 21] (2.7B) or [8, 16, 24] (2.7B, 3 attention layers).
The attention layers are flash-attn's MHA with biases and no positions (the H3 layers carry
them; no absolute embeddings either), except the 2-attention 2.7B, which rotates the first 64
of each 128-dim head. GPT-2 vocabulary 50257 padded to a multiple of 8; tied embeddings. The
2.7B initialises with std sqrt(2 / (5 d)) (safari's config for it).

safari's training configs place attention elsewhere for the smaller sizes ([1, 8] for 12
layers, [1, 13] for 24); the presets follow the checkpoints, so that released weights load.
"""

from __future__ import annotations

import math

from plait.models.common.config import ModelConfig
from plait.models.common.mixers import SoftmaxOptions
from plait.models.common.presets import Preset

from .config import H3Options


def h3(
    d: int, layers: int, heads: int, attn: tuple[int, ...], vocab: int = 50257, rotary_dim=0
) -> ModelConfig:
    """``rotary_dim`` 0: no positions in the attention layers; else partial rotary."""
    return ModelConfig(
        pattern="".join("A" if i in attn else "H" for i in range(layers)),
        num_layers=layers,
        hidden_size=d,
        num_heads=heads,
        mlp="gelu",
        norm="layernorm",
        norm_eps=1e-5,
        vocab_size=vocab,
        vocab_multiple=8,
        tie_embeddings=True,
        options={
            "h3": H3Options(state_size=64, head_dim=1),
            "softmax": SoftmaxOptions(bias=True, rotary=rotary_dim > 0, rotary_dim=rotary_dim),
        },
    )


def _h3_2_7b(attn: tuple[int, ...], rotary_dim: int) -> ModelConfig:
    cfg = h3(2560, 32, 20, attn, rotary_dim=rotary_dim)
    cfg.init_std = math.sqrt(2 / (5 * 2560))
    return cfg


def _tiny() -> ModelConfig:
    cfg = h3(64, 4, 4, (1,), vocab=0)
    cfg.h3.state_size = 16
    return cfg


PRESETS = {
    "h3-125m": Preset(lambda: h3(768, 12, 12, (6,)), 125e6, "released (danfu09/H3-125M)"),
    "h3-355m": Preset(lambda: h3(1024, 24, 16, (8, 16)), 355e6, "released (danfu09/H3-355M)"),
    "h3-1.3b": Preset(
        lambda: h3(2048, 24, 16, (8, 16)), 1.3e9, "released (danfu09/H3-1.3B); the 1B-class preset"
    ),
    "h3-2.7b": Preset(
        lambda: _h3_2_7b((10, 21), 64), 2.7e9, "released (danfu09/H3-2.7B, model-2attn-rotary)"
    ),
    "h3-2.7b-3attn": Preset(
        lambda: _h3_2_7b((8, 16, 24), 0), 2.7e9, "released (danfu09/H3-2.7B, model-3attn)"
    ),
    "h3-25m": Preset(
        lambda: h3(512, 7, 8, (3,), vocab=0),
        None,
        "benchmarks/train_step.py; attention mid-stack as in 125M",
    ),
    "h3-tiny": Preset(_tiny, None, "CPU tests"),
}
