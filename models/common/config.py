"""The model's typed configuration.

The hybrid layout is a pattern string, one letter per layer, each letter registered by a
family (``family.py``); the rest are the usual transformer sizes, and each family's own options
are a section named after the family (``cfg.moh.top_k``, ``model.moh.top_k`` in YAML), held in
``options`` and created from the family's dataclass. ``validate`` names the field and the
allowed values of whatever is wrong; the launcher's config loader prefixes the path
(``model.pattern``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from plait.errors import UserError

from . import family


class ModelConfigError(UserError, ValueError):
    """A model field is invalid; the message names the field."""


@dataclass
class ModelConfig:
    families: list[str] = field(default_factory=list)
    """Python modules to import before the rest of the model config is read, each registering
    families of its own (``plait.models.common.family.register``): families kept outside
    plait. Empty: plait's own (``plait.models.registry``)."""
    preset: str = ""
    """Start from a named preset (``plait.models.presets``); fields given beside it override
    the preset's. Empty: no preset."""
    pattern: str = "LLAL"
    """One letter per layer (the letters are registered in ``family.py``'s catalogue; plait's
    own by ``plait.models.registry``): L lightning, A softmax attention, B Based linear
    attention, W sliding window, C gated short conv, H H3, S SeqBoat, M MoH."""
    num_layers: int = 4
    """Number of blocks; must equal len(pattern)."""
    pipeline_marks: list[int] = field(default_factory=list)
    """Where ``|`` marks in the pattern cut it into pipeline stages (``LLLA|LLLA``): the layer
    indices that start a new stage. Filled from the pattern (the marks are then removed from
    it); empty: the balancer cuts (parallel/stages.py)."""
    hidden_size: int = 128
    """Model width."""
    num_heads: int = 4
    """Heads of every token mixer; hidden_size must be divisible by it."""
    ffn_hidden_size: int = 0
    """Inner width of the channel mixer; 0 means 8/3 * hidden rounded up to a multiple of 64."""
    mlp: Literal["swiglu", "glu", "gelu", "none"] = "swiglu"
    """swiglu: W3(silu(W1 x) * W2 x); glu: TransNormerLLM's SGLU, W3(W1 x * W2 x), no
    activation; gelu: the GPT-2 MLP W2(gelu(W1 x)) (H3's), with biases; none: no channel
    mixer, each block is its token mixer alone (SeqBoat's released enwik8 model)."""
    norm: Literal["rmsnorm", "srmsnorm", "layernorm"] = "rmsnorm"
    """rmsnorm has a learned scale; srmsnorm (simple RMSNorm) has none; layernorm subtracts
    the mean and has a learned scale and bias (the GPT-2 blocks of H3's and SeqBoat's
    released models)."""
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
    init_std: float = 0.02
    """Std of the normal init; output projections use init_std / sqrt(2 * num_layers)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Each family's options by family name, read as ``cfg.<family>``; every registered
    family with options has its section (defaults unless given)."""

    def __post_init__(self) -> None:
        for name, fam in family.families().items():
            if fam.options is not None and name not in self.options:
                self.options[name] = fam.options()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: a family's options section. A family
        # registered after this config was made gets its defaults on first use.
        options = self.__dict__.get("options")
        if options is None or name.startswith("__"):
            raise AttributeError(name)
        if name not in options:
            kind = family.options_type(name)
            if kind is None:
                raise AttributeError(f"ModelConfig has no field or family options {name!r}")
            options[name] = kind()
        return options[name]

    def to_dict(self) -> dict[str, Any]:
        """The fields with each family's section under its own name (as in YAML)."""
        out = asdict(self)
        out.update(out.pop("options"))
        return out

    def validate(self, catalogue: family.Catalogue) -> None:
        """Check every field against ``catalogue``, the families this config may use (the
        config loader and the model pass ``family.catalogue()``): letters, option sections and
        each used family's own checks."""
        if "|" in self.pattern:
            parts = self.pattern.split("|")
            if not all(parts):
                raise ModelConfigError(f"pattern: {self.pattern!r} has an empty pipeline stage")
            cuts, n = [], 0
            for part in parts[:-1]:
                n += len(part)
                cuts.append(n)
            self.pattern, self.pipeline_marks = "".join(parts), cuts
        LETTERS = {s: lt for s, (_, lt) in catalogue.letters.items()}
        bad = sorted({c for c in self.pattern if c not in LETTERS})
        if not self.pattern or bad:
            allowed = ", ".join(f"{k} ({v.description})" for k, v in LETTERS.items())
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
        used = {catalogue.family_of(c).name for c in self.pattern}
        for name, section in self.options.items():
            kind = catalogue.options_type(name)
            if kind is None or not isinstance(section, kind):
                raise ModelConfigError(
                    f"{name}: no registered family has options {type(section).__name__}"
                )
            try:
                section.validate()
                if name in used and hasattr(section, "check"):
                    section.check(self)
            except ModelConfigError as e:
                msg = str(e)
                raise ModelConfigError(msg if msg.startswith(name) else f"{name}.{msg}") from None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.mlp == "none":
            return 0
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.mlp == "gelu":
            return 4 * self.hidden_size
        return -(-(8 * self.hidden_size // 3) // 64) * 64

    def padded_vocab_size(self, vocab_size: int | None = None) -> int:
        v = vocab_size or self.vocab_size
        if v <= 0:
            raise ModelConfigError("vocab_size: unknown (0) and no tokenizer vocabulary given")
        return -(-v // self.vocab_multiple) * self.vocab_multiple
