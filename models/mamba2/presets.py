"""Mamba-2 hybrid presets: Bamba-9B at its released shape (ibm-ai-platform/Bamba-9B's
config.json: 32 layers of Mamba-2 mixer + SwiGLU MLP, softmax attention at layers 9, 18 and
27, 128 heads of 64 channels, one group of B and C with 128 states, the 128,256-token
vocabulary, untied embeddings), plus a tiny model for tests, a ~25M one for the benchmarks
and a 1B-class one on plait's 32K tokenizer for the Slurm templates."""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset

from .config import Mamba2Options

BAMBA_VOCAB = 128256


def bamba(
    d: int, layers: int, ffn: int, attn_layers: tuple[int, ...], attn: tuple[int, int],
    ssm: tuple[int, int, int, int], vocab: int = BAMBA_VOCAB, chunk: int = 64,
) -> ModelConfig:
    """attn: (query heads, key/value heads); ssm: (heads, head_dim, groups, state);
    ``attn_layers``: the indices of the R layers (Bamba's attn_layer_indices)."""
    heads, kv = attn
    sh, sd, groups, state = ssm
    return ModelConfig(
        pattern="".join("R" if i in attn_layers else "D" for i in range(layers)),
        num_layers=layers,
        hidden_size=d,
        num_heads=heads,
        ffn_hidden_size=ffn,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-5,
        vocab_size=vocab,
        tie_embeddings=False,
        rope_theta=10000.0,
        options={
            "mamba2": Mamba2Options(
                heads=sh, head_dim=sd, groups=groups, state=state, conv_kernel=4,
                chunk=chunk, attn_kv_heads=kv, partial_rotary=0.5,
            )
        },
    )


PRESETS = {
    # two groups for eight heads, 2 kv heads for 4: grouping exercised at test size
    "mamba2-tiny": Preset(
        lambda: bamba(64, 4, 128, (1,), (4, 2), (8, 16, 2, 16), vocab=0, chunk=16),
        None, "CPU tests",
    ),
    "mamba2-25m": Preset(
        lambda: bamba(512, 8, 1280, (3, 7), (8, 2), (16, 64, 1, 64), vocab=0),
        None, "benchmarks/train_step.py",
    ),
    "mamba2-1b": Preset(
        lambda: bamba(2048, 16, 5632, (6, 14), (16, 4), (64, 64, 1, 128), vocab=32000),
        None, "the 1B-class preset: Bamba's layer shapes at width 2048, 16 layers, plait's 32K "
        "vocabulary",
    ),
    "bamba-9b": Preset(
        lambda: bamba(4096, 32, 14336, (9, 18, 27), (32, 8), (128, 64, 1, 128)),
        9.78e9, "ibm-ai-platform/Bamba-9B (transformers' BambaForCausalLM: 9,780,235,392)",
    ),
}
