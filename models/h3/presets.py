"""H3 hybrid presets: the released 125M, 355M, 1.3B and 2.7B configs and a tiny CPU one.

From the H3 reference configs: GPT-2 blocks (GELU MLP of 4d with biases), H3 layers with
head_dim 1 and state 64, softmax attention at layers (1, 8) for 12 layers, (1, 13) for 24,
(10, 21) for 32; GPT-2 vocabulary 50257 padded to a multiple of 8; tied embeddings.
LayerNorm in the reference, RMSNorm here (d fewer parameters per norm).
"""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset

from .config import H3Options


def h3(d: int, layers: int, heads: int, attn: tuple[int, ...], vocab: int = 50257):
    return ModelConfig(
        pattern="".join("A" if i in attn else "H" for i in range(layers)),
        num_layers=layers,
        hidden_size=d,
        num_heads=heads,
        mlp="gelu",
        norm="rmsnorm",
        vocab_size=vocab,
        vocab_multiple=8,
        tie_embeddings=True,
        options={"h3": H3Options(state_size=64, head_dim=1)},
    )


def _tiny() -> ModelConfig:
    cfg = h3(64, 4, 4, (1,), vocab=0)
    cfg.h3.state_size = 16
    return cfg


PRESETS = {
    "h3-125m": Preset(lambda: h3(768, 12, 12, (1, 8)), 125e6, "released"),
    "h3-355m": Preset(lambda: h3(1024, 24, 16, (1, 13)), 355e6, "released"),
    "h3-1.3b": Preset(lambda: h3(2048, 24, 16, (1, 13)), 1.3e9, "released; the 1B-class preset"),
    "h3-2.7b": Preset(lambda: h3(2560, 32, 20, (10, 21)), 2.7e9, "released"),
    "h3-tiny": Preset(_tiny, None, "CPU tests"),
}
