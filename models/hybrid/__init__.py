"""Presets of hybrids that mix families' letters (no letters of their own): the embedded
default of ``make demo`` and configs/tiny.yaml."""

from plait.models.common.config import ModelConfig
from plait.models.common.family import Family
from plait.models.common.presets import Preset


def _tiny() -> ModelConfig:
    """Lightning attention (with plait's per-head norm, not TransNormerLLM's full set) and
    softmax attention in turn, LLaMA-style channel mixer; the vocabulary comes from the
    tokenizer."""
    return ModelConfig(
        pattern="LALA",
        num_layers=4,
        hidden_size=128,
        num_heads=4,
        ffn_hidden_size=384,
        mlp="swiglu",
        norm="rmsnorm",
        tie_embeddings=True,
        lightning_block=64,
    )


def _25m() -> ModelConfig:
    """hybrid-tiny's layout at ~25M parameters (with a 2048-token vocabulary): the size
    benchmarks/train_step.py compares with transformers' Llama of the same shape."""
    return ModelConfig(
        pattern="LALALALA",
        num_layers=8,
        hidden_size=512,
        num_heads=8,
        ffn_hidden_size=1280,
        mlp="swiglu",
        norm="rmsnorm",
        tie_embeddings=True,
        lightning_block=64,
    )


def _window_tiny() -> ModelConfig:
    """hybrid-tiny with sliding-window attention (W, Based's letter: ``based.window`` 64 keys)
    in place of the global softmax layers: no layer attends over the whole sequence, so a
    step's time and memory grow linearly in its length (the longest-sequence runs of
    benchmarks/long_sequence.py; one global softmax layer at 1M tokens is hours of CPU)."""
    cfg = _tiny()
    cfg.pattern = "LWLW"
    return cfg


FAMILY = Family(
    name="hybrid",
    description="plait's mixed hybrids (letters of the other families)",
    letters=(),
    presets={
        "hybrid-tiny": Preset(_tiny, None, "the embedded CPU default (configs/tiny.yaml)"),
        "hybrid-25m": Preset(_25m, None, "hybrid-tiny's layout at ~25M (benchmarks/train_step.py)"),
        "hybrid-window-tiny": Preset(
            _window_tiny, None, "linear + window, no global softmax (benchmarks/long_sequence.py)"
        ),
    },
)
