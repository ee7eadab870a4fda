"""What a model family declares, and the catalogue the families are registered in.

A family (one folder under models/) exports one ``Family``: its letters, each a ``Letter``
that says everything the rest of plait needs to know about a token mixer (the module, its
parameter count, how tensor parallelism splits it, how it maps to the HF layout, what it
costs, how it runs under sequence parallelism, what a decode cache keeps for it), its options
section of ``ModelConfig`` and its presets. ``plait.models.registry`` registers the families
plait ships; code outside plait registers its own with the same ``register`` call, and a run
config can import such a module (``model.families``). Nothing in models/common names a family
or a letter beyond the shared softmax attention ``A``.

This module imports nothing of plait at run time, so every other module of common/ can look
letters up here without an import cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from plait.errors import UserError

if TYPE_CHECKING:

    from .config import ModelConfig
    from .hf_export import LetterExport, NativeLayout
    from .presets import Preset
    from .tp_plan import Split


@dataclass(frozen=True)
class LetterDoc:
    """What a letter is, in words: read by people and by docs/models.md's generator (nothing
    runs on it)."""

    description: str
    sequence_parallel: str
    """How it runs when the sequence is split over the context-parallel ranks: what crosses
    the ranks and why it is enough (e.g. LASP-2's one all-gather of fixed-size states)."""
    decode_state: str
    """What a decode cache keeps for this letter between tokens (constant-size for linear and
    SSM letters, growing for softmax ones)."""
    release: str = ""
    """The authors' released code this letter computes by default (repository and module)."""
    differs_from_release: str = ""
    """Every deliberate difference from that code (docs/models.md's column of that name);
    "none" when it computes the same function."""


class Mixer(Protocol):
    """The contract of a letter's token mixer (``Letter.mixer``), checked by ``register``.

    Built as ``mixer(cfg, mp, layer_idx, sp)`` (the model config, megatron's parallel config,
    the layer, the ``SequenceParallel`` context); it opens no process group and runs its
    token mixing through plait.parallel's functions of ``sp``. ``forward(x [B, T, hidden],
    positions [B, T], doc_ids [B, T] or None) -> [B, T, hidden]``. ``decode(x, positions,
    state) -> (y, state)`` continues a sequence by T tokens from ``state`` (None: the start,
    when it must equal ``forward``); the state is a dict of tensors of this rank's heads and
    the outputs equal ``forward`` over the whole sequence so far (tests/models/test_decode.py).
    Three static methods describe it from the config alone, so that a run's layout and cost
    are known before anything is built: ``param_count``, the logical parameter count;
    ``tp_split``, {config field: the count tensor parallelism divides among its ranks};
    ``halo``, (config field, tokens): how many of the previous context-parallel rank's last
    tokens each rank needs (a rank's chunk must hold them), ("", 0) for none. A mixer with
    auxiliary losses or gauges also has ``auxiliary() -> list[Auxiliary]``."""

    def __init__(self, cfg: ModelConfig, mp: Any, layer_idx: int, sp: Any) -> None: ...

    def forward(self, x_BTC: Any, positions_BT: Any, doc_ids_BT: Any = None) -> Any: ...

    def decode(self, x_BTC: Any, positions_BT: Any, state: dict | None) -> tuple[Any, dict]: ...

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int: ...

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]: ...

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]: ...


@dataclass(frozen=True)
class Letter:
    """One token mixer: a pattern letter, and the hooks the rest of plait calls for it."""

    symbol: str
    mixer: type[Mixer]
    tp_plan: Mapping[str, Split]
    """Split of every mixer parameter (names relative to ``blocks.{i}.mixer.``): the layers
    split themselves; ``build_model`` checks every built parameter against this plan, and the
    checkpoints and the export rely on it."""
    hf_export: LetterExport
    """The letter in the HF layout: its HF-side class and the mapping of its tensors."""
    mixing_flops: Callable[[ModelConfig, int, int], float]
    """(cfg, layer_idx, seq_len) -> forward FLOPs per token spent mixing tokens, beyond the
    2 x parameters of the mixer's projections: with ``param_count`` it is the letter's cost
    in the cost model (models/common/cost.py: the pipeline-stage balancer, MFU)."""
    doc: LetterDoc
    zigzag: bool = False
    """Runs with the zigzag token layout (ring attention's balanced causal split); letters
    that pass states or halos from rank to rank need the contiguous layout."""
    selective_recompute: bool = False
    """``training.recompute: selective`` re-runs this letter's whole block in the backward
    instead of keeping its activations: True for the softmax-like mixers (scores and
    probabilities saved per query, recomputed in one batched pass); False for linear-state
    and convolution letters, which keep their mixer's activations (recomputing a chunk-state
    scan repeats its serial loop and, under LASP-2, its all-gather) and re-run only the MLP
    (models/common/lm.py, ``Block.recomputed``)."""

    @property
    def description(self) -> str:
        return self.doc.description

    def cost(self, cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
        """Forward FLOPs per token of the mixer: 2 x parameters + token mixing."""
        return 2.0 * self.mixer.param_count(cfg, layer_idx) + self.mixing_flops(
            cfg, layer_idx, seq_len
        )


@dataclass(frozen=True)
class Family:
    name: str
    """Also the name of the options section: ``model.<name>.<field>``."""
    description: str
    letters: tuple[Letter, ...]
    options: type | None = None
    """A dataclass with defaults and ``validate()``, held as ``cfg.<name>``; it may also
    define ``check(cfg)`` for checks that need the rest of the model config, run when the
    pattern uses one of the family's letters."""
    presets: Mapping[str, Preset] = field(default_factory=dict)
    hf_code: Path | None = None
    """The file of the family's HF-side mixers (its ``hf_mixer.py``): plain PyTorch that an
    export ships beside plait's modeling code (models/common/hf_code.py); each letter names
    its class in ``hf_export.hf_class``. Required when the family has letters."""
    one_b: str = ""
    """The family's 1B-class preset (what the Slurm templates train); empty: none."""
    native: NativeLayout | None = None
    """A transformers class whose released checkpoints this family imports and exports
    natively (models/common/hf_export.py); None: plait's own layout only."""


@dataclass
class Auxiliary:
    """A mixer's auxiliary output of the last forward pass, returned by its ``auxiliary()``
    method: a loss the model adds to the LM loss in training, or a gauge it only logs."""

    name: str
    """Metric name (logged as ``train/<name>``); averaged over the layers that report it."""
    value: Any
    """A scalar tensor (carrying gradient when it is a loss)."""
    loss_weight: float = 0.0
    """The layer mean is added to the training loss times this; 0: logged only."""


def fft_conv_flops(channels: int, seq_len: int) -> float:
    """FLOPs per token of a causal convolution by FFT over 2T points (three real FFTs of
    ~2.5 N log2 N FLOPs each, plus the pointwise product), for ``mixing_flops``."""
    n = 2 * seq_len
    return channels * (3 * 2.5 * n * math.log2(max(n, 2)) + 6 * n) / seq_len


class RegistryError(UserError, ValueError):
    """A family or letter clashes with one already registered, or is incomplete."""


MIXER_METHODS = ("param_count", "tp_split", "halo", "forward", "decode")
"""What every mixer class declares (``Letter.mixer``, the ``Mixer`` protocol)."""

_FAMILIES: dict[str, Family] = {}
_LETTERS: dict[str, tuple[Family, Letter]] = {}
_PRESETS: dict[str, tuple[Family, Preset]] = {}


def register(family: Family) -> Family:
    """Add a family to the catalogue (idempotent for the same record)."""
    if _FAMILIES.get(family.name) is family:
        return family
    if family.name in _FAMILIES:
        raise RegistryError(f"family {family.name!r} is already registered")
    for letter in family.letters:
        if len(letter.symbol) != 1 or not letter.symbol.isalpha() or not letter.symbol.isupper():
            raise RegistryError(f"family {family.name}: letter {letter.symbol!r} is not A-Z")
        if letter.symbol in _LETTERS:
            other = _LETTERS[letter.symbol][0].name
            raise RegistryError(
                f"family {family.name}: letter {letter.symbol} is already {other}'s"
            )
        for method in MIXER_METHODS:
            if not callable(getattr(letter.mixer, method, None)):
                raise RegistryError(
                    f"family {family.name}: letter {letter.symbol}'s mixer "
                    f"{letter.mixer.__name__} has no {method} (the Mixer protocol)"
                )
    if family.letters and (family.hf_code is None or not Path(family.hf_code).is_file()):
        raise RegistryError(
            f"family {family.name}: hf_code {family.hf_code} is not a file (the HF-side "
            "mixers every export ships)"
        )
    for letter in family.letters:
        cls = letter.hf_export.hf_class
        if not cls or not _defines_class(Path(family.hf_code), cls):
            raise RegistryError(
                f"family {family.name}: letter {letter.symbol}'s hf_export.hf_class {cls!r} is "
                f"not a class of {family.hf_code}"
            )
    clash = sorted(set(family.presets) & set(_PRESETS))
    if clash:
        raise RegistryError(f"family {family.name}: presets {clash} are already registered")
    if family.one_b and family.one_b not in family.presets:
        raise RegistryError(f"family {family.name}: one_b {family.one_b!r} is not a preset")
    _FAMILIES[family.name] = family
    for letter in family.letters:
        _LETTERS[letter.symbol] = (family, letter)
    for name, preset in family.presets.items():
        _PRESETS[name] = (family, preset)
    return family


def _defines_class(path: Path, name: str) -> bool:
    """Whether the file defines a top-level class ``name`` (read, not imported: an HF module
    imports its siblings in an export, not plait)."""
    import ast

    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.ClassDef) and n.name == name for n in tree.body)


@dataclass(frozen=True)
class Catalogue:
    """A snapshot of the registered families, handed to what checks a config against them
    (``ModelConfig.validate``): the letters it may use, the families that own them and
    their options sections. ``catalogue()`` takes it from the registry."""

    families: Mapping[str, Family]
    letters: Mapping[str, tuple[Family, Letter]]

    def letter(self, symbol: str) -> Letter:
        return self.letters[symbol][1]

    def family_of(self, symbol: str) -> Family:
        return self.letters[symbol][0]

    def options_type(self, name: str) -> type | None:
        fam = self.families.get(name)
        return fam.options if fam else None


def catalogue() -> Catalogue:
    """The registry as it is now (families registered later are not in it)."""
    return Catalogue(dict(_FAMILIES), dict(_LETTERS))


def families() -> dict[str, Family]:
    return dict(_FAMILIES)


def letters() -> dict[str, Letter]:
    return {symbol: letter for symbol, (_, letter) in _LETTERS.items()}


def letter(symbol: str) -> Letter:
    if symbol not in _LETTERS:
        known = ", ".join(f"{s} ({lt.description})" for s, lt in letters().items())
        raise KeyError(f"letter {symbol!r} is not registered; known: {known}")
    return _LETTERS[symbol][1]


def family_of(symbol: str) -> Family:
    letter(symbol)
    return _LETTERS[symbol][0]


def presets() -> dict[str, tuple[Family, Preset]]:
    return dict(_PRESETS)


def options_type(name: str) -> type | None:
    """The options dataclass of the family called ``name`` (None: no such family, or one
    without options)."""
    family = _FAMILIES.get(name)
    return family.options if family else None
