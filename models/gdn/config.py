"""Gated DeltaNet's options: ``model.gdn.*`` (the names of Qwen3.5's text config beside
plait's: ``linear_num_key_heads`` is ``key_heads`` and so on; models/gdn/qwen35.py maps them)."""

from __future__ import annotations

from dataclasses import dataclass

from plait.models.common.config import ModelConfig, ModelConfigError


@dataclass
class GdnOptions:
    """Letters G (the Gated DeltaNet mixer) and Q (Qwen3.5's gated softmax attention)."""

    key_heads: int = 4
    """G: query/key heads (``linear_num_key_heads``); each serves value_heads / key_heads
    consecutive value heads, as grouped-query attention does."""
    value_heads: int = 4
    """G: value heads (``linear_num_value_heads``), each with its own state, decay and beta."""
    key_dim: int = 32
    """G: query/key head width (``linear_key_head_dim``)."""
    value_dim: int = 32
    """G: value head width (``linear_value_head_dim``)."""
    conv_kernel: int = 4
    """G: taps of the causal depthwise convolution on q, k and v (``linear_conv_kernel_dim``)."""
    chunk: int = 64
    """G: chunk length of the chunked (WY / UT) kernel; the release's is 64."""
    a_init_max: float = 16.0
    """G: A = exp(A_log) starts uniform in [0.01, a_init_max] per value head (the release's
    16; flash-linear-attention's layer draws from [1, 16]). Heads with a large A forget their
    state within a token at init, so their A_log gets almost no gradient."""
    attn_heads: int = 0
    """Q: query heads (``num_attention_heads``); 0 means ``model.num_heads``."""
    attn_kv_heads: int = 0
    """Q: key/value heads (``num_key_value_heads``); 0 means as many as attn_heads."""
    attn_head_dim: int = 0
    """Q: head width (``head_dim``, 256 in every Qwen3.5); 0 means hidden_size / num_heads."""
    partial_rotary: float = 0.25
    """Q: the fraction of each head's dims that rotate (``partial_rotary_factor``)."""

    def validate(self) -> None:
        for name in ("key_heads", "value_heads", "key_dim", "value_dim", "conv_kernel", "chunk"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"gdn.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("attn_heads", "attn_kv_heads", "attn_head_dim"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"gdn.{name}: must be >= 0, got {getattr(self, name)}")
        if self.value_heads % self.key_heads:
            raise ModelConfigError(
                f"gdn.value_heads: {self.value_heads} is not a multiple of key_heads "
                f"{self.key_heads}"
            )
        if self.a_init_max <= 0.01:
            raise ModelConfigError(f"gdn.a_init_max: must be > 0.01, got {self.a_init_max}")
        if not 0.0 <= self.partial_rotary <= 1.0:
            raise ModelConfigError(
                f"gdn.partial_rotary: must be in [0, 1], got {self.partial_rotary}"
            )

    def check(self, cfg: ModelConfig) -> None:
        heads, kv = self.heads(cfg), self.kv_heads(cfg)
        if heads % kv:
            raise ModelConfigError(
                f"gdn.attn_kv_heads: {heads} query heads are not a multiple of {kv}"
            )
        if self.rotary_dim(cfg) % 2:
            raise ModelConfigError(
                f"gdn.partial_rotary: {self.partial_rotary} of {self.head_dim(cfg)} dims is "
                "not an even number of rotary dims"
            )

    def heads(self, cfg: ModelConfig) -> int:
        return self.attn_heads or cfg.num_heads

    def kv_heads(self, cfg: ModelConfig) -> int:
        return self.attn_kv_heads or self.heads(cfg)

    def head_dim(self, cfg: ModelConfig) -> int:
        return self.attn_head_dim or cfg.head_dim

    def rotary_dim(self, cfg: ModelConfig) -> int:
        """Rotating dims per head: int(head_dim * partial_rotary), as the release's rotary
        embedding computes it."""
        return int(self.head_dim(cfg) * self.partial_rotary)
