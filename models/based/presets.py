"""Based presets: the released 360M and 1.3B configs and a tiny CPU one.

From the reference configs (HazyResearch/based, train/configs/experiment/reference): Taylor
linear attention (16 heads, feature dim 16) at layers 1, 6, 11, 16, 21 (and 27, 33 at 1.3B),
sliding window (16 heads) one layer later, BaseConv (expand 4, kernel 3) elsewhere; SwiGLU MLP
with inner 2d, RMSNorm with eps 1e-5 (GPT2Config's default: no released config sets it),
the GPT-2 vocabulary (50257, the released checkpoints' 50264 rows), tied embeddings.
The released window: the configs say 256, and the layer hands flash attention
``window_size=(256 // 2, 0)``, so a query sees itself and the 128 keys before it: 129 keys,
which is what plait's ``based.window`` counts.
"""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset

from .config import BasedOptions


def based_pattern(layers: int, linear: list[int], window: list[int]) -> str:
    return "".join("B" if i in linear else "W" if i in window else "C" for i in range(layers))


def based(d: int, layers: int, linear: list[int], window: list[int], vocab: int = 50257):
    return ModelConfig(
        pattern=based_pattern(layers, linear, window),
        num_layers=layers,
        hidden_size=d,
        num_heads=16,
        ffn_hidden_size=2 * d,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        vocab_size=vocab,
        vocab_multiple=8,
        tie_embeddings=True,
        options={"based": BasedOptions(feature_dim=16, window=129, conv_kernel=3, conv_expand=4)},
    )


def _tiny() -> ModelConfig:
    cfg = based(64, 5, [1], [2], vocab=0)
    cfg.num_heads, cfg.based.feature_dim, cfg.based.window = 4, 8, 16
    cfg.lightning_block = 16
    return cfg


PRESETS = {
    "based-360m": Preset(
        lambda: based(1024, 27, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22]), 360e6, "released"
    ),
    "based-1.3b": Preset(
        lambda: based(1792, 36, [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34]),
        1.3e9,
        "released; the 1B-class preset",
        "the name is rounded: the released config itself gives 1.35B (tied, vocab 50264)",
    ),
    "based-25m": Preset(
        lambda: based(512, 8, [1, 6], [2, 7], vocab=0),
        None,
        "benchmarks/train_step.py; the released layer order",
    ),
    "based-tiny": Preset(_tiny, None, "CPU tests"),
}
