"""The model's typed configuration.

The hybrid layout is a pattern string, one letter per layer (see ``pattern.py``); the
rest are the usual transformer sizes. ``validate`` names the field and the allowed values
of whatever is wrong; the launcher's config loader prefixes the path (``model.pattern``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


class ModelConfigError(ValueError):
    """A model field is invalid; the message names the field."""


@dataclass
class ModelConfig:
    pattern: str = "LLAL"
    """One letter per layer: L = lightning linear attention, A = causal softmax attention."""
    num_layers: int = 4
    """Number of blocks; must equal len(pattern)."""
    hidden_size: int = 128
    """Model width."""
    num_heads: int = 4
    """Heads of every token mixer; hidden_size must be divisible by it."""
    ffn_hidden_size: int = 0
    """Inner width of the channel mixer; 0 means 8/3 * hidden rounded up to a multiple of 64."""
    mlp: Literal["swiglu", "glu"] = "swiglu"
    """swiglu: W3(silu(W1 x) * W2 x); glu: TransNormerLLM's SGLU, W3(W1 x * W2 x), no activation."""
    norm: Literal["rmsnorm", "srmsnorm"] = "rmsnorm"
    """rmsnorm has a learned scale; srmsnorm (simple RMSNorm) has none."""
    norm_eps: float = 1e-6
    """Epsilon inside the norms' rsqrt."""
    vocab_size: int = 0
    """Tokenizer vocabulary; 0 means take it from the tokenizer at build time."""
    vocab_multiple: int = 128
    """The embedding table is padded to a multiple of this (it must be divisible by TP)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    rope_theta: float = 10000.0
    """Rotary base of the softmax-attention layers."""
    lightning_block: int = 64
    """Block size of the chunked lightning-attention path."""
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."""

    def validate(self) -> None:
        from .pattern import MIXERS  # local: pattern imports the mixers, which import torch

        bad = sorted({c for c in self.pattern if c not in MIXERS})
        if not self.pattern or bad:
            allowed = ", ".join(f"{k} ({v.description})" for k, v in MIXERS.items())
            raise ModelConfigError(
                f"pattern: {self.pattern!r} has unknown letter(s) {bad or '(empty pattern)'}; "
                f"allowed: {allowed}"
            )
        if len(self.pattern) != self.num_layers:
            raise ModelConfigError(
                f"pattern: {self.pattern!r} has {len(self.pattern)} letters but num_layers is "
                f"{self.num_layers}; give one letter per layer"
            )
        for name in ("num_layers", "hidden_size", "num_heads", "vocab_multiple", "lightning_block"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ModelConfigError(
                f"num_heads: hidden_size {self.hidden_size} is not divisible by {self.num_heads}"
            )
        if self.ffn_hidden_size < 0 or self.vocab_size < 0:
            raise ModelConfigError("ffn_hidden_size and vocab_size must be >= 0")
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ModelConfigError("init_std, norm_eps and rope_theta must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    def padded_vocab_size(self, vocab_size: int | None = None) -> int:
        v = vocab_size or self.vocab_size
        if v <= 0:
            raise ModelConfigError("vocab_size: unknown (0) and no tokenizer vocabulary given")
        return -(-v // self.vocab_multiple) * self.vocab_multiple
