"""Mamba-2's options: ``model.mamba2.*`` (plait's names beside Bamba's config fields:
``heads`` is ``mamba_n_heads`` and so on; models/mamba2/bamba.py maps them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.models.common.config import ModelConfig, ModelConfigError


@dataclass
class Mamba2Options:
    """Letters D (the Mamba-2 mixer) and R (Bamba's grouped-query attention)."""

    heads: int = 8
    """D: SSM heads (``mamba_n_heads``), each with its own state, dt and A."""
    head_dim: int = 16
    """D: channels per head (``mamba_d_head``); heads x head_dim is the mixer's width."""
    groups: int = 1
    """D: groups of B and C (``mamba_n_groups``), each shared by heads / groups consecutive
    heads, as grouped-query attention shares keys; also the gated norm's groups."""
    state: int = 16
    """D: state size per head (``mamba_d_state``): the width of B and C."""
    conv_kernel: int = 4
    """D: taps of the causal depthwise convolution on x, B and C (``mamba_d_conv``)."""
    conv_bias: bool = True
    """D: the convolution has a bias (``mamba_conv_bias``)."""
    proj_bias: bool = False
    """D: in_proj and out_proj have biases (``mamba_proj_bias``)."""
    chunk: int = 64
    """D: block of the chunked kernel (plait's lightning kernel; Bamba's ``mamba_chunk_size``
    only sets its own computation's granularity, not the function)."""
    dt_min: float = 0.0
    """D: dt = softplus(dt_raw + dt_bias) is clamped to [dt_min, dt_max] (``time_step_limit``)."""
    dt_max: float = 0.0
    """D: the upper clamp; 0 means none (the release's default, infinity)."""
    init: Literal["mamba_ssm", "transformers"] = "mamba_ssm"
    """D: how A_log and dt_bias start. mamba_ssm (the Mamba-2 authors' layer, what Bamba was
    pretrained with): A uniform in [1, 16], dt log-uniform in [0.001, 0.1] (floor 1e-4) with
    dt_bias = softplus^-1(dt). transformers (BambaMixer's own init): A = 1..heads, dt_bias 1,
    so that at Bamba's 128 heads most heads forget their state within a token."""
    attn_kv_heads: int = 0
    """R: key/value heads (``num_key_value_heads``); 0 means ``model.num_heads``."""
    partial_rotary: float = 0.5
    """R: the fraction of each head's dims that rotate (Bamba fixes it at 0.5)."""

    def validate(self) -> None:
        for name in ("heads", "head_dim", "groups", "state", "conv_kernel", "chunk"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"mamba2.{name}: must be >= 1, got {getattr(self, name)}")
        if self.attn_kv_heads < 0:
            raise ModelConfigError(f"mamba2.attn_kv_heads: must be >= 0, got {self.attn_kv_heads}")
        if self.heads % self.groups:
            raise ModelConfigError(
                f"mamba2.heads: {self.heads} is not a multiple of groups {self.groups}"
            )
        if self.dt_min < 0 or self.dt_max < 0 or (self.dt_max and self.dt_max < self.dt_min):
            raise ModelConfigError(
                f"mamba2.dt_min/dt_max: need 0 <= dt_min <= dt_max (0: none), got "
                f"{self.dt_min}, {self.dt_max}"
            )
        if self.init not in ("mamba_ssm", "transformers"):
            raise ModelConfigError(
                f"mamba2.init: {self.init!r} is not one of 'mamba_ssm', 'transformers'"
            )
        if not 0.0 <= self.partial_rotary <= 1.0:
            raise ModelConfigError(
                f"mamba2.partial_rotary: must be in [0, 1], got {self.partial_rotary}"
            )

    def check(self, cfg: ModelConfig) -> None:
        kv = self.kv_heads(cfg)
        if cfg.num_heads % kv:
            raise ModelConfigError(
                f"mamba2.attn_kv_heads: {cfg.num_heads} query heads are not a multiple of {kv}"
            )
        if self.rotary_dim(cfg) % 2:
            raise ModelConfigError(
                f"mamba2.partial_rotary: {self.partial_rotary} of {cfg.head_dim} dims is not "
                "an even number of rotary dims"
            )

    @property
    def width(self) -> int:
        """The mixer's inner width, heads x head_dim (Bamba's mamba_expand x hidden)."""
        return self.heads * self.head_dim

    def kv_heads(self, cfg: ModelConfig) -> int:
        return self.attn_kv_heads or cfg.num_heads

    def rotary_dim(self, cfg: ModelConfig) -> int:
        """Rotating dims per head: int(head_dim * partial_rotary), as the release computes."""
        return int(cfg.head_dim * self.partial_rotary)
