"""SeqBoat presets.

``seqboat-enwik8`` is the released model: the authors' only released LM script
(renll/SeqBoat examples/seqboat/README.lm.md, architecture ``slag_lm_enwik8_base_v2``,
fairseq/models/seqboat_lm.py): 14 S layers of width 616 without channel mixer, hdim 1232,
zdim 128, EMA dim 16, chunk 1024 (window 1025 here), EMA kernel 2048 taps, router
temperature scale 1.0, LayerNorm pre-norm, input embedding scaled by sqrt(d), tied
embeddings, byte vocabulary. The released run also has dropout 0.15 and a final norm
without affine, which plait does not reproduce (see mixer.py); it trains on 8192-token
samples. The released dictionary is fairseq's: the bytes seen in the enwik8 training split
plus 4 special symbols, padded to a multiple of 8; it is not in the repository (it comes
with the binarised data), so the preset uses the 256 byte values.

The size presets (``seqboat-360m``, ``seqboat-1b``) are not released models: the paper
trains no general LM at these sizes. They are comparable-size LMs built from the released
layer (EMA dim 16, zdim 128, hdim 2d, the enwik8 window of 1025), each S layer followed by a
SwiGLU channel mixer (the role of the released NFFN, which the fairseq base architectures
have at width hdim and the enwik8 script turns off), with RMSNorm.
"""

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
        options={"seqboat": SeqBoatOptions(ema_dim=16, zdim=128, window=1025)},
    )


def _enwik8() -> ModelConfig:
    return ModelConfig(
        pattern="S" * 14,
        num_layers=14,
        hidden_size=616,
        num_heads=1,
        mlp="none",
        norm="layernorm",
        norm_eps=1e-5,
        vocab_size=256,
        vocab_multiple=8,
        tie_embeddings=True,
        embed_scale=True,
        options={
            "seqboat": SeqBoatOptions(
                ema_dim=16,
                zdim=128,
                hdim=1232,
                window=1025,
                ema_truncation=2048,
                router_temperature=1.0,
            )
        },
    )


def _tiny() -> ModelConfig:
    """A window and an EMA truncation that bite at the CPU tests' lengths (tens of tokens)."""
    cfg = seqboat(64, 3, 128, vocab=0)
    cfg.seqboat.zdim, cfg.seqboat.window, cfg.seqboat.ema_truncation = 16, 8, 24
    return cfg


PRESETS = {
    "seqboat-enwik8": Preset(
        _enwik8, None, "released: the enwik8 script (slag_lm_enwik8_base_v2), bytes"
    ),
    "seqboat-360m": Preset(lambda: seqboat(1024, 22, 2048), None, "comparable to Based 360M"),
    "seqboat-1b": Preset(lambda: seqboat(2048, 16, 4096), None, "the 1B-class preset"),
    "seqboat-25m": Preset(lambda: seqboat(512, 7, 1024, vocab=0), None, "benchmarks/train_step.py"),
    "seqboat-tiny": Preset(_tiny, None, "CPU tests"),
}
