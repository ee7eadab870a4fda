"""Typed run configuration: dataclasses loaded from YAML, with ``--set a.b=c`` overrides.

Each section is a dataclass owned by the package it configures (model -> plait.models,
parallel -> plait.parallel, data -> plait.data); the sections for the optimizer, training,
checkpoints and logging live here. Loading checks every key and type against the
dataclasses and then calls each section's ``validate``; any error names the file, the
dotted field and, for choices, the allowed values. YAML is parsed with ``safe_load``:
configs are data, never code.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from plait.data.config import DataConfig
from plait.errors import UserError
from plait.models.common.config import ModelConfig
from plait.models.common.family import catalogue as family_catalogue
from plait.models.common.family import families
from plait.models.common.lm import Recompute
from plait.models.presets import apply_preset
from plait.parallel.config import ParallelConfig
from plait.parallel.cpu_heap import CpuHeap


class ConfigError(UserError, ValueError):
    """Invalid configuration; the message names the source and the field."""


@dataclass
class OptimizerConfig:
    name: Literal["lamb", "adamw"] = "lamb"
    """lamb: plait.parallel.lamb (trust ratio over whole tensors); adamw: torch.optim.AdamW."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Linear warmup from 0, in optimizer steps."""
    decay_steps: int = 0
    """Length of warmup + cosine decay; 0 means training.steps."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    """Decoupled weight decay; never applied to 1-D tensors (norms, biases)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off (passed to DeepSpeed explicitly,
    whose own default is to clip at 1.0 when nothing is set)."""
    min_trust: float = 0.01
    """LAMB trust-ratio clamp (DeepSpeed's fused LAMB uses [0.01, 10])."""
    max_trust: float = 10.0

    def validate(self) -> None:
        for name in ("lr", "eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("min_lr", "weight_decay", "grad_clip", "warmup_steps", "decay_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr: {self.min_lr} is above lr {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.min_trust <= self.max_trust:
            raise ConfigError("min_trust/max_trust: need 0 < min_trust <= max_trust")


@dataclass
class TrainingConfig:
    steps: int = 200
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per data-parallel rank per micro step."""
    grad_accum: int = 1
    """Micro steps per optimizer step. Global batch = micro_batch_size * grad_accum * DP."""
    eval_every: int = 50
    """Validation loss every this many steps (and at the end); 0 turns it off."""
    eval_batches: int = 4
    """Micro batches per validation pass (per data-parallel rank)."""
    eval_passkey: int = 0
    """Passkey sequences per depth (0, 0.5, 1) scored at each validation, at the training
    length, logged as ``val/passkey@<depth>``; 0: none. The loss by position bucket is
    logged at every validation anyway (``val/loss_pos_<p>``)."""
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU (where bf16 matmul is ~100x slower)."""
    recompute: Recompute = "none"
    """Activation checkpointing, traded for a second forward of what is recomputed: none;
    full (every block keeps only its input and is re-run in the backward); selective (blocks
    of softmax-like letters re-run whole, the others keep their mixer's activations and
    re-run the MLP: models/common/lm.py ``Block.recomputed``). Losses and gradients equal
    none's."""
    cpu_heap: CpuHeap = "bounded"
    """How a CPU run's processes keep freed memory (glibc; parallel/cpu_heap.py says how and
    docs/benchmarks.md "The CPU heap at 16K" has the measurements): release (blocks over
    32 MB mapped and returned when freed: a 25M model at 16K tokens spends a third of its
    step faulting in fresh pages); keep (every block from the heap, kept when freed:
    unbounded, h3-25m's 16K step outgrew a 24 GB machine); bounded (keep, with the heap
    trimmed from a thread, every 50 ms, whenever the resident set outgrows the most live
    memory seen by 10% or the machine, or the job's cgroup, has under 10% of its memory
    available: keep's speed, and the 1M-token CP=4 run fits). No effect on CUDA, nor where
    glibc's own variables (MALLOC_*, GLIBC_TUNABLES) are set."""
    time_limit: float = 0.0
    """Wall-clock seconds this process may train; the run saves and exits (with the requeue
    code) ``exit_margin`` seconds before. 0: no limit of its own. Under Slurm the job's end
    time (``SLURM_JOB_END_TIME``) is a limit too, whichever comes first."""
    exit_margin: float = 300.0
    """Seconds before a time limit at which the run saves and exits (a save must fit)."""
    max_skipped_in_a_row: int = 3
    """Steps skipped for a non-finite loss or gradient norm, in a row, that stop the run (with
    a checkpoint of the last good state and exit code 3)."""
    spike_zscore: float = 0.0
    """Skip the optimizer step, on every rank, when the step's loss is more than this many
    standard deviations above the mean of the last ``spike_window`` accepted steps (a spike
    from one bad batch then leaves no trace in the weights); 0: off. Spike skips are counted
    apart (``spike_skipped_steps``) and count toward ``max_skipped_in_a_row``."""
    spike_window: int = 100
    """Accepted (not skipped) steps the spike test compares with; it starts once this many
    have been seen."""

    def validate(self) -> None:
        for name in ("steps", "micro_batch_size", "grad_accum", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_passkey < 0:
            raise ConfigError("eval_every and eval_passkey must be >= 0")
        if self.time_limit < 0 or self.exit_margin < 0 or self.max_skipped_in_a_row < 1:
            raise ConfigError(
                "time_limit and exit_margin must be >= 0 and max_skipped_in_a_row >= 1"
            )
        if self.spike_zscore < 0 or self.spike_window < 2:
            raise ConfigError("spike_zscore must be >= 0 (0: off) and spike_window >= 2")


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Where checkpoints go; empty means <out_dir>/checkpoints (launcher/checkpoint/ says
    what one holds)."""
    save_every: int = 0
    """Save every this many steps (and at the end of the run, on preemption and at a time
    limit); 0 saves only then."""
    resume: str = "auto"
    """auto: the newest complete checkpoint in ``dir`` if there is one (incomplete or corrupt
    ones are reported and skipped); never: start fresh; or the path of one checkpoint."""
    keep_last: int = 3
    """Complete checkpoints kept (older ones deleted after each save); 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, permanently; 0: none."""
    init_from: str = ""
    """A checkpoint (any kind, e.g. one ``python -m plait.launcher.export --from-hf`` wrote)
    whose weights a NEW run starts from: step 0, fresh optimizer and schedule. Ignored when
    ``resume`` finds a checkpoint of this run to continue. Empty: random init."""
    allow_changes: list[str] = field(default_factory=list)
    """Run differences a resume accepts: ``data`` (datasets, tokenizer, sequence length,
    data seed). The model and the optimizer must match."""
    async_save: bool = False
    """Write checkpoints in the background: the gathers still run at the step boundary, then
    rank 0 writes, hashes and renames in a thread while training continues (at most one save
    in flight; the next save and the end of the run wait for it). Off by default: rank 0 then
    holds a CPU copy of the whole state (12 bytes a parameter) instead of one ~1 GiB shard at
    a time, and the writer shares the host's cores with training."""

    def validate(self) -> None:
        if self.save_every < 0 or self.keep_last < 0 or self.keep_every < 0:
            raise ConfigError("save_every, keep_last and keep_every must be >= 0")
        bad = sorted(set(self.allow_changes) - {"data"})
        if bad:
            raise ConfigError(f"allow_changes: {bad} not allowed; only 'data' can change")
        if not self.resume:
            raise ConfigError("resume: give auto, never or a checkpoint path")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files to <out_dir>/tensorboard."""
    log_every: int = 1
    """Console/TensorBoard scalars every this many steps."""
    progress_bar: bool = True

    def validate(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"log_every: must be >= 1, got {self.log_every}")


@dataclass
class Config:
    out_dir: str = "runs/tiny"
    """Run directory: tensorboard/, checkpoints/, the tokenizer and token cache."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, source: str = "config") -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                try:
                    if isinstance(section, ModelConfig):  # against the families registered now
                        section.validate(family_catalogue())
                    else:
                        section.validate()
                except ValueError as e:
                    raise ConfigError(f"{source}: {f.name}.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every field, shaped as a config file (family options under their own names)."""
        out = dataclasses.asdict(self)
        out["model"] = self.model.to_dict()
        return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{where}: {value!r} is not one of the allowed values "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _apply(obj: Any, data: dict[str, Any], prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "options"]
    sections: list[str] = []
    if isinstance(obj, ModelConfig):
        sections = [name for name, f in families().items() if f.options is not None]
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names and key not in sections:
            known = ", ".join(names + sections)
            raise ConfigError(f"{source}: unknown field {where!r}; known fields here: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{where}.", source)
        else:
            try:
                setattr(obj, key, _coerce(value, hints[key], where))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def parse_override(item: str) -> dict[str, Any]:
    """``a.b=c`` -> {"a": {"b": c}}, the value parsed as YAML (so 3, 1e-3, true, LLAL work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    if isinstance(value, dict):
        raise ConfigError(f"--set {item!r}: give a scalar or a [list] per --set")
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _model_first(cfg: Config, layers: list[tuple[dict[str, Any], str]]) -> None:
    """Before any other field: import the modules named in ``model.families`` (they register
    families whose options sections the rest may set), then apply ``model.preset``; the last
    source that gives either wins. The preset therefore never wipes a field given beside it,
    in the same file or in an earlier one."""
    for key in ("families", "preset"):
        given = [
            (data["model"][key], source)
            for data, source in layers
            if isinstance(data.get("model"), dict) and key in data["model"]
        ]
        if not given:
            continue
        value, source = given[-1]
        try:
            if key == "families":
                cfg.model.families = _coerce(value, list[str], "model.families")
                for module in cfg.model.families:
                    importlib.import_module(module)
                cfg.model.__post_init__()  # sections of the families just registered
            elif value != "":  # "" is no preset (what a config without one saves)
                apply_preset(cfg.model, _coerce(value, str, "model.preset"))
        except ImportError as e:
            raise ConfigError(f"{source}: model.families: cannot import {e.name}: {e}") from None
        except ValueError as e:
            msg = str(e) if str(e).startswith("model.") else f"model.{e}"
            raise ConfigError(f"{source}: {msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    source = "defaults"
    layers: list[tuple[dict[str, Any], str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        source = str(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: top level: expected a mapping, got {data!r}")
        layers.append((data, source))
    layers += [(parse_override(item), f"--set {item}") for item in overrides or []]
    return _build(cfg, layers, source if not overrides else f"{source} (with --set overrides)")


def config_from_dict(data: dict[str, Any], source: str) -> Config:
    """A config from one mapping shaped as a config file (a checkpoint's saved config)."""
    return _build(Config(), [(data, source)], source)


def _build(cfg: Config, layers: list[tuple[dict[str, Any], str]], source: str) -> Config:
    _model_first(cfg, layers)
    for data, where in layers:
        if isinstance(data.get("model"), dict):
            model = {k: v for k, v in data["model"].items() if k not in ("families", "preset")}
            data = {**data, "model": model}
        _apply(cfg, data, "", where)
    cfg.validate(source)
    return cfg
