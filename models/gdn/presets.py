"""Gated DeltaNet presets: Qwen3.5's dense text models at their released shapes (from the
released config.json files: three G layers, then one Q layer, repeating; SwiGLU MLPs;
zero-centred RMSNorms stored as weights; rotary base 1e7 on a quarter of each 256-dim
attention head; the 248,320-token vocabulary), plus a tiny model for tests, a ~25M one for
the benchmarks and a 1B-class one on plait's 32K tokenizer for the Slurm templates."""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset

from .config import GdnOptions

QWEN35_VOCAB = 248320


def gdn(
    d: int, layers: int, ffn: int, attn: tuple[int, int, int], linear: tuple[int, int, int, int],
    vocab: int = QWEN35_VOCAB, tie: bool = True, every: int = 4, chunk: int = 64,
) -> ModelConfig:
    """attn: (query heads, key/value heads, head dim); linear: (key heads, value heads, key
    dim, value dim); one Q layer after every ``every`` - 1 G layers (Qwen3.5's
    full_attention_interval)."""
    heads, kv, head_dim = attn
    kh, vh, kd, vd = linear
    pattern = "".join("Q" if (i + 1) % every == 0 else "G" for i in range(layers))
    return ModelConfig(
        pattern=pattern,
        num_layers=layers,
        hidden_size=d,
        num_heads=heads if d % heads == 0 else d // head_dim,
        ffn_hidden_size=ffn,
        mlp="swiglu",
        norm="rmsnorm",
        norm_eps=1e-6,
        vocab_size=vocab,
        tie_embeddings=tie,
        rope_theta=1e7,
        options={
            "gdn": GdnOptions(
                key_heads=kh, value_heads=vh, key_dim=kd, value_dim=vd, conv_kernel=4,
                chunk=chunk, attn_heads=heads, attn_kv_heads=kv, attn_head_dim=head_dim,
                partial_rotary=0.25,
            )
        },
    )


def _tiny() -> ModelConfig:
    # head_dim 32 != hidden / heads = 16 and 2 key heads for 4 value heads: the release's
    # independent attention width and grouped heads are exercised at test size.
    return gdn(64, 4, 128, (4, 2, 32), (2, 4, 16, 16), vocab=0, tie=False, chunk=16)


_CARD = (
    "the model card's size counts the vision encoder and the multi-token-prediction layer; "
    "plait's count is the text model's, equal to transformers' Qwen3_5ForCausalLM built "
    "from the released config (tests/models/test_gdn.py)"
)

PRESETS = {
    "gdn-tiny": Preset(_tiny, None, "CPU tests"),
    "gdn-25m": Preset(
        lambda: gdn(512, 8, 1280, (4, 2, 128), (4, 8, 64, 64), vocab=0, tie=False),
        None, "benchmarks/train_step.py",
    ),
    "gdn-1b": Preset(
        lambda: gdn(2048, 20, 6144, (8, 2, 256), (16, 16, 128, 128), vocab=32000, tie=False),
        None, "the 1B-class preset: Qwen3.5-2B's layer shapes, 20 layers (5 x GGGQ: PP=4 "
        "balances within 1.2x), plait's 32K vocabulary",
    ),
    "qwen3.5-0.8b": Preset(
        lambda: gdn(1024, 24, 3584, (8, 2, 256), (16, 16, 128, 128)),
        0.8e9, "Qwen/Qwen3.5-0.8B's text model", _CARD,
    ),
    "qwen3.5-2b": Preset(
        lambda: gdn(2048, 24, 6144, (8, 2, 256), (16, 16, 128, 128)),
        2e9, "Qwen/Qwen3.5-2B's text model", _CARD,
    ),
    "qwen3.5-4b": Preset(
        lambda: gdn(2560, 32, 9216, (16, 4, 256), (16, 32, 128, 128)),
        4e9, "Qwen/Qwen3.5-4B's text model", _CARD,
    ),
    "qwen3.5-9b": Preset(
        lambda: gdn(4096, 32, 12288, (16, 4, 256), (16, 32, 128, 128), tie=False),
        9e9, "Qwen/Qwen3.5-9B's text model", _CARD,
    ),
    "qwen3.5-27b": Preset(
        lambda: gdn(5120, 64, 17408, (24, 4, 256), (16, 48, 128, 128), tie=False),
        27e9, "Qwen/Qwen3.5-27B's text model", _CARD,
    ),
}
