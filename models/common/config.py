"""The model's typed configuration.

The hybrid layout is a pattern string, one letter per layer (see ``pattern.py``); the
rest are the usual transformer sizes. ``validate`` names the field and the allowed values
of whatever is wrong; the launcher's config loader prefixes the path (``model.pattern``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ModelConfigError(ValueError):
    """A model field is invalid; the message names the field."""


@dataclass
class BasedOptions:
    """Letters B (Taylor linear attention), W (sliding window) and C (gated short conv)."""

    feature_dim: int = 16
    """Per-head q/k dimension fed to the 2nd-order Taylor feature map (153 features at 16)."""
    window: int = 64
    """Sliding-window size of W layers (the query's own token included)."""
    conv_kernel: int = 3
    """Kernel size of the depthwise causal convolution of C layers."""
    conv_expand: int = 4
    """C layers project hidden -> conv_expand * hidden / 2 channels for each of the conv and
    gate halves (the reference BaseConv's expand_proj; 4 in the published configs)."""
    eps: float = 1e-6
    """Added to the linear attention's normaliser."""

    def validate(self) -> None:
        for name in ("feature_dim", "window", "conv_kernel", "conv_expand"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"based.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass
class H3Options:
    """Letter H (H3: shift SSM on k, diagonal SSM on k*v, multiplicative gates)."""

    state_size: int = 64
    """SSM state size N (the diagonal SSM keeps N/2 complex conjugate pairs)."""
    head_dim: int = 1
    """Per-head dimension of the k v^T outer product (1 = elementwise k * v, H3's default)."""
    ssm_lr_cap: float = 1e-3
    """SSM parameters train at min(ssm_lr_cap, optimizer.lr), without weight decay."""

    def validate(self) -> None:
        if self.state_size < 2 or self.state_size % 2:
            raise ModelConfigError(f"h3.state_size: must be even and >= 2, got {self.state_size}")
        if self.head_dim < 1:
            raise ModelConfigError(f"h3.head_dim: must be >= 1, got {self.head_dim}")
        if self.ssm_lr_cap <= 0:
            raise ModelConfigError(f"h3.ssm_lr_cap: must be > 0, got {self.ssm_lr_cap}")


@dataclass
class SeqBoatOptions:
    """Letter S (SeqBoat: EMA, a router, GAU local attention on the active tokens only)."""

    ema_dim: int = 16
    """Components of the multi-head (per-channel) damped EMA."""
    zdim: int = 64
    """Shared query/key dimension of the single-head GAU."""
    hdim: int = 0
    """Value / gate dimension of the GAU; 0 means 2 * hidden_size."""
    window: int = 64
    """Local attention chunk on the compressed (active) tokens: a query sees its own chunk
    causally and the whole previous chunk."""
    router: Literal["learned", "on", "off"] = "learned"
    """learned: the SMA router decides; on / off force every token active / inactive (tests)."""

    def validate(self) -> None:
        for name in ("ema_dim", "zdim", "window"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"seqboat.{name}: must be >= 1, got {getattr(self, name)}")
        if self.hdim < 0:
            raise ModelConfigError(f"seqboat.hdim: must be >= 0, got {self.hdim}")
        if self.zdim % 2:
            raise ModelConfigError(f"seqboat.zdim: must be even (rotary), got {self.zdim}")


@dataclass
class MoHOptions:
    """Letter M (Mixture-of-Head attention)."""

    shared_heads: int = 2
    """Heads every token uses; the other num_heads - shared_heads are routed."""
    top_k: int = 2
    """Routed heads each token activates."""
    balance_coef: float = 0.01
    """Weight of the load-balance loss added to the LM loss."""

    def validate(self) -> None:
        if self.shared_heads < 0 or self.top_k < 1 or self.balance_coef < 0:
            raise ModelConfigError(
                "moh: shared_heads must be >= 0, top_k >= 1 and balance_coef >= 0, got "
                f"{self.shared_heads}, {self.top_k}, {self.balance_coef}"
            )


@dataclass
class ModelConfig:
    preset: str = ""
    """Start from a named preset (``plait.models.presets``); fields given beside it override
    the preset's. Empty: no preset."""
    pattern: str = "LLAL"
    """One letter per layer (see ``pattern.py``): L lightning, A softmax attention, B Based
    linear attention, W sliding window, C gated short conv, H H3, S SeqBoat, M MoH."""
    num_layers: int = 4
    """Number of blocks; must equal len(pattern)."""
    hidden_size: int = 128
    """Model width."""
    num_heads: int = 4
    """Heads of every token mixer; hidden_size must be divisible by it."""
    ffn_hidden_size: int = 0
    """Inner width of the channel mixer; 0 means 8/3 * hidden rounded up to a multiple of 64."""
    mlp: Literal["swiglu", "glu", "gelu"] = "swiglu"
    """swiglu: W3(silu(W1 x) * W2 x); glu: TransNormerLLM's SGLU, W3(W1 x * W2 x), no
    activation; gelu: the GPT-2 MLP W2(gelu(W1 x)) (H3's), with biases."""
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
    lightning_norm: Literal["full", "head"] = "head"
    """Where L layers normalise the attention output: over the full width (TransNormerLLM;
    one small all-reduce per layer under TP) or per head (GroupNorm-like, collective-free)."""
    lrpe: Literal["none", "first", "all"] = "none"
    """Which L layers apply TransNormerLLM's LRPE to q and k (doubles their head dim): none,
    the first L layer (the released models), or all."""
    embed_scale: bool = False
    """Multiply the token embeddings by sqrt(hidden_size) (TransNormerLLM)."""
    based: BasedOptions = field(default_factory=BasedOptions)
    h3: H3Options = field(default_factory=H3Options)
    seqboat: SeqBoatOptions = field(default_factory=SeqBoatOptions)
    moh: MoHOptions = field(default_factory=MoHOptions)
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."""

    def validate(self) -> None:
        from .pattern import mixers  # local: the mixers import torch and megatron

        MIXERS = mixers()

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
        for sub in (self.based, self.h3, self.seqboat, self.moh):
            sub.validate()
        if "M" in self.pattern and self.moh.shared_heads + self.moh.top_k > self.num_heads:
            raise ModelConfigError(
                f"moh: shared_heads {self.moh.shared_heads} + top_k {self.moh.top_k} exceeds "
                f"num_heads {self.num_heads}"
            )
        if "M" in self.pattern and self.moh.shared_heads >= self.num_heads:
            raise ModelConfigError(
                f"moh.shared_heads: {self.moh.shared_heads} of {self.num_heads} heads leaves "
                "no routed head"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.mlp == "gelu":
            return 4 * self.hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    @property
    def seqboat_hdim(self) -> int:
        return self.seqboat.hdim or 2 * self.hidden_size

    def padded_vocab_size(self, vocab_size: int | None = None) -> int:
        v = vocab_size or self.vocab_size
        if v <= 0:
            raise ModelConfigError("vocab_size: unknown (0) and no tokenizer vocabulary given")
        return -(-v // self.vocab_multiple) * self.vocab_multiple
