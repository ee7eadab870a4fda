"""Mapping a full (TP-gathered) plait state dict to the HF checkpoint layout and back.

The five families have no modeling code in transformers, so the exported checkpoint pairs
with plait's own HF modeling code (the HF-export issue). Its names follow one LLaMA-like
skeleton so that any hybrid pattern maps: ``model.embed_tokens``, per layer
``model.layers.{i}.input_layernorm`` / ``post_attention_layernorm`` / ``mlp.*`` and the
token mixer under ``model.layers.{i}.mixer.*``, named after each family's reference code
where it has one (TransNormerLLM's fused ``qkvu_proj``, Based's ``proj_q``/``Wqkv``/
``in_proj``, H3's ``q_proj``...), ``model.norm``, ``lm_head``. Fused projections are
re-laid out: plait interleaves roles per head (so that a contiguous TP split hands each rank
whole heads); the references keep each role contiguous.

Each family's ``hf_export.py`` defines a ``LetterExport`` per letter (its family entry's
``Letter.hf_export``); ``to_hf`` and
``from_hf`` are exact inverses (tested), and every tensor is mapped exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import family

if TYPE_CHECKING:
    from .config import ModelConfig

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LetterExport:
    """A letter in the HF layout: its HF-side module (the class ``hf_class`` in its family's
    ``Family.hf_code`` file, shipped with every export: models/common/hf_code.py) and the
    mapping of its tensors both ways."""

    to_hf: Callable[[State, ModelConfig, int], State]
    """(mixer tensors named relative to ``blocks.{i}.mixer.``, cfg, layer) -> HF tensors
    named relative to ``model.layers.{i}.mixer.``"""
    from_hf: Callable[[State, ModelConfig, int], State]
    constants: tuple[str, ...] = ()
    """HF names the export writes that hold no plait parameter: fixed values of a released
    parameter plait folds into another (H3's SSM B vectors), which ``from_hf`` folds back,
    so a released checkpoint whose B trained imports exactly."""
    hf_class: str = ""
    """The HF-side mixer class, defined in the family's ``hf_code`` file (required)."""


def split_roles(w: torch.Tensor, heads: int, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Rows [head, role, dim] (plait's fused layout) -> one [heads * dim_r, ...] per role."""
    per_head = w.view(heads, sum(dims), *w.shape[1:])
    return [
        p.reshape(heads * d, *w.shape[1:])
        for p, d in zip(per_head.split(dims, 1), dims, strict=True)
    ]


def merge_roles(parts: list[torch.Tensor], heads: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``split_roles``."""
    rest = parts[0].shape[1:]
    per_head = [p.view(heads, d, *rest) for p, d in zip(parts, dims, strict=True)]
    return torch.cat(per_head, 1).reshape(heads * sum(dims), *rest)


def _attention_to_hf(s: State, cfg: ModelConfig, i: int) -> State:
    d = cfg.head_dim
    out = {"o_proj.weight": s["proj.out_proj.weight"]}
    for kind in ("weight", "bias"):
        if f"proj.in_proj.{kind}" in s:  # biases with softmax.bias
            q, k, v = split_roles(s[f"proj.in_proj.{kind}"], cfg.num_heads, (d, d, d))
            out.update({f"q_proj.{kind}": q, f"k_proj.{kind}": k, f"v_proj.{kind}": v})
    if "proj.out_proj.bias" in s:
        out["o_proj.bias"] = s["proj.out_proj.bias"]
    return out


def _attention_from_hf(s: State, cfg: ModelConfig, i: int) -> State:
    d = cfg.head_dim
    out = {"proj.out_proj.weight": s["o_proj.weight"]}
    for kind in ("weight", "bias"):
        if f"q_proj.{kind}" in s:
            parts = [s[f"q_proj.{kind}"], s[f"k_proj.{kind}"], s[f"v_proj.{kind}"]]
            out[f"proj.in_proj.{kind}"] = merge_roles(parts, cfg.num_heads, (d, d, d))
    if "o_proj.bias" in s:
        out["proj.out_proj.bias"] = s["o_proj.bias"]
    return out


ATTENTION = LetterExport(_attention_to_hf, _attention_from_hf, hf_class="SoftmaxAttention")


_MLP = {
    "swiglu": {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"},
    "glu": {"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"},
    "gelu": {"w1": "fc1", "w2": "fc2"},
    "none": {},
}
_TOP = {"embedding.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
        "final_norm.bias": "model.norm.bias", "output.weight": "lm_head.weight"}
_NORMS = {"mixer_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def _take(state: State, prefix: str) -> State:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def to_hf(state: State, cfg: ModelConfig) -> State:
    """Full plait state (``gather_full``) -> HF-layout tensors (the same storage where no
    re-layout is needed). Raises if a tensor would be left unmapped."""
    out: State = {}
    used: set[str] = set()
    for src, dst in _TOP.items():
        if src in state:
            out[dst] = state[src]
            used.add(src)
    for i, letter in enumerate(cfg.pattern):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for src, dst in _NORMS.items():
            for kind in ("weight", "bias"):
                if f"{p}{src}.{kind}" in state:
                    out[f"{q}{dst}.{kind}"] = state[f"{p}{src}.{kind}"]
                    used.add(f"{p}{src}.{kind}")
        for src, dst in _MLP[cfg.mlp].items():
            for kind in ("weight", "bias"):
                if f"{p}mlp.{src}.{kind}" in state:
                    out[f"{q}mlp.{dst}.{kind}"] = state[f"{p}mlp.{src}.{kind}"]
                    used.add(f"{p}mlp.{src}.{kind}")
        mixer = _take(state, f"{p}mixer.")
        used.update(f"{p}mixer.{k}" for k in mixer)
        export = family.letter(letter).hf_export
        hf = export.to_hf(mixer, cfg, i)
        mapped = sum(v.numel() for k, v in hf.items() if k not in export.constants)
        if mapped != sum(v.numel() for v in mixer.values()):
            raise KeyError(f"to_hf: layer {i} ({letter}): tensors {sorted(mixer)} not all mapped")
        for k, v in hf.items():
            out[f"{q}mixer.{k}"] = v
    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"to_hf: no HF name for {left}")
    return out


def from_hf(hf: State, cfg: ModelConfig) -> State:
    """Inverse of ``to_hf``."""
    out: State = {}
    for src, dst in _TOP.items():
        if dst in hf:
            out[src] = hf[dst]
    for i, letter in enumerate(cfg.pattern):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        for src, dst in _NORMS.items():
            for kind in ("weight", "bias"):
                if f"{q}{dst}.{kind}" in hf:
                    out[f"{p}{src}.{kind}"] = hf[f"{q}{dst}.{kind}"]
        for src, dst in _MLP[cfg.mlp].items():
            for kind in ("weight", "bias"):
                if f"{q}mlp.{dst}.{kind}" in hf:
                    out[f"{p}mlp.{src}.{kind}"] = hf[f"{q}mlp.{dst}.{kind}"]
        for k, v in (
            family.letter(letter).hf_export.from_hf(_take(hf, f"{q}mixer."), cfg, i).items()
        ):
            out[f"{p}mixer.{k}"] = v
    return out


def rename(pairs: dict[str, str], hf_class: str) -> LetterExport:
    """A letter whose tensors map one to one under new names (absent ones skipped), to the
    HF mixer class ``hf_class``."""
    back = {v: k for k, v in pairs.items()}

    def fwd(s: State, cfg: ModelConfig, i: int) -> State:
        missing = sorted(set(s) - set(pairs))
        if missing:
            raise KeyError(f"to_hf: no HF name for mixer tensors {missing}")
        return {pairs[k]: v for k, v in s.items()}

    def inv(s: State, cfg: ModelConfig, i: int) -> State:
        return {back[k]: v for k, v in s.items()}

    return LetterExport(fwd, inv, hf_class=hf_class)


@dataclass(frozen=True)
class NativeLayout:
    """A released model class in transformers that a family's checkpoints also export to and
    import from (``Family.native``): config.json and tensor names of that class, loaded by
    ``AutoModelForCausalLM`` without remote code. An export uses it when ``fits`` says the
    class can express the model (else plait's own layout and code); an import picks it by
    config.json's ``model_type``."""

    architecture: str
    """The transformers class, e.g. ``Qwen3_5ForCausalLM``."""
    model_types: tuple[str, ...]
    """config.json ``model_type`` values it imports (the first is what it writes)."""
    fits: Callable[[ModelConfig], str]
    """"" when the class can express the model config, else why not (one line)."""
    config_to_hf: Callable[[ModelConfig, int], dict]
    """(cfg, vocab rows) -> config.json fields (no token ids; the export adds them)."""
    config_from_hf: Callable[[dict, str], ModelConfig]
    """(config.json, where it came from) -> the model config; a ModelConfigError naming the
    field for what plait cannot take."""
    to_hf: Callable[[State, ModelConfig], State]
    """Full plait state -> the class's tensors (every tensor mapped once)."""
    from_hf: Callable[[State, ModelConfig], State]
    """The inverse."""


# ----------------------------------------------------------- helpers of the native layouts
# Qwen3.5 and Bamba (and the LLaMA-like released hybrids after them) share the skeleton:
# embedding, pre-norm blocks of one mixer and one SwiGLU MLP, a final norm, an untied or tied
# head. What differs is the names of the norms and MLP, and the mixers.


def native_common_fields(cfg: ModelConfig, vocab: int) -> dict:
    """config.json fields every LLaMA-like released class has, from plait's model config."""
    return {
        "vocab_size": vocab,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_size,
        "num_hidden_layers": cfg.num_layers,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": False,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


class NativeFields:
    """A released config.json being read: ``need`` names the missing field and the file in
    one ModelConfigError line; ``model_kwargs`` gives the ModelConfig fields every LLaMA-like
    class shares, after refusing what plait's block cannot compute (another activation,
    attention biases, a rope scaling type)."""

    def __init__(self, t: dict, where: str, what: str, eps: float):
        self.t, self.where, self.what, self.eps = t, where, what, eps

    def need(self, key: str):
        from .config import ModelConfigError

        if key not in self.t:
            raise ModelConfigError(f"{self.where}: no {key} (not a {self.what} config)")
        return self.t[key]

    def rope(self) -> dict:
        return self.t.get("rope_parameters") or {}

    def model_kwargs(self) -> dict:
        from .config import ModelConfigError

        t, where = self.t, self.where
        if t.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(
                f"{where}: hidden_act {t['hidden_act']!r}; {self.what} uses silu"
            )
        if t.get("attention_bias", False):
            raise ModelConfigError(f"{where}: attention_bias true is not {self.what}'s attention")
        rope = self.rope()
        if rope.get("rope_type", "default") != "default":
            raise ModelConfigError(
                f"{where}: rope_parameters.rope_type {rope['rope_type']!r}; plait imports 'default'"
            )
        return dict(
            num_layers=int(self.need("num_hidden_layers")),
            hidden_size=int(self.need("hidden_size")),
            ffn_hidden_size=int(self.need("intermediate_size")),
            mlp="swiglu",
            norm="rmsnorm",
            norm_eps=float(t.get("rms_norm_eps", self.eps)),
            vocab_size=int(self.need("vocab_size")),
            vocab_multiple=1,
            tie_embeddings=bool(t.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
            init_std=float(t.get("initializer_range", 0.02)),
        )


def rename_skeleton(src: State, cfg: ModelConfig, top: dict[str, str], block: dict[str, str],
                    to_hf: bool) -> State:
    """The embedding, final norm, head and each block's norms and MLP renamed between plait
    (``top``/``block`` keys; block names under ``blocks.{i}.``) and the class (values; under
    ``model.layers.{i}.``). On import a tied head is the embedding: a written ``lm_head``
    (transformers may save it) is not taken."""
    out: State = {}
    for p, h in top.items():
        a, b = (p, h) if to_hf else (h, p)
        if a in src and not (not to_hf and cfg.tie_embeddings and p == "output.weight"):
            out[b] = src[a]
    for i in range(cfg.num_layers):
        for p, h in block.items():
            a, b = (f"blocks.{i}.{p}", f"model.layers.{i}.{h}")
            out[b if to_hf else a] = src[a if to_hf else b]
    return out


def check_all_mapped(state: State, hf: State, name: str, from_hf) -> None:
    """Every plait tensor went somewhere exactly once (else the unmapped names)."""
    if sum(v.numel() for v in hf.values()) != sum(v.numel() for v in state.values()):
        raise KeyError(f"{name} layout: plait tensors left unmapped: "
                       f"{sorted(set(state) - set(from_hf(hf)))}")
