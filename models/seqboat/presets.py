"""SeqBoat presets. The paper trains no general LM at these sizes, so these are
comparable-size LMs built from its layer (EMA dim 16, zdim 128, hdim 2d, local window 256,
as in its LM settings), each S layer followed by a SwiGLU channel mixer (Mega's NFFN role);
the names are sizes, not published models."""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset

from .config import SeqBoatOptions


def seqboat(d: int, layers: int, ffn: int, vocab: int = 50277) -> ModelConfig:
    return ModelConfig(
        pattern="S" * layers,
        num_layers=layers,
        hidden_size=d,
        num_heads=1,
        ffn_hidden_size=ffn,
        mlp="swiglu",
        norm="rmsnorm",
        vocab_size=vocab,
        vocab_multiple=8,
        tie_embeddings=True,
        options={"seqboat": SeqBoatOptions(ema_dim=16, zdim=128, window=256)},
    )


def _tiny() -> ModelConfig:
    cfg = seqboat(64, 3, 128, vocab=0)
    cfg.seqboat.zdim, cfg.seqboat.window = 16, 8
    return cfg


PRESETS = {
    "seqboat-360m": Preset(lambda: seqboat(1024, 22, 2048), None, "comparable to Based 360M"),
    "seqboat-1b": Preset(lambda: seqboat(2048, 16, 4096), None, "the 1B-class preset"),
    "seqboat-tiny": Preset(_tiny, None, "CPU tests"),
}
