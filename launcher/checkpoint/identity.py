"""What a checkpoint records about the run that wrote it, and the refusal to resume it in a
run that differs: ``RunIdentity`` (model, optimizer, data, tokenizer) compared field by
field by ``check_fits``, with a hint that never leads to another refusal; and the parallel
layout, which decides whether the RNG states carry over."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .format import CheckpointError


@dataclasses.dataclass
class RunIdentity:
    """What a checkpoint must agree with to be resumed: checked at load, field by field."""

    model: dict
    optimizer: str
    data: dict
    tokenizer_sha256: str

    def differences(self, saved: RunIdentity) -> dict[str, list[str]]:
        """Every field where this run differs from the ``saved`` one, by part (model, data,
        optimizer), each as ``field: saved -> this run`` with the full dotted name
        (``data.prepare.vocab_size: 2048 -> 1024``). An empty ``tokenizer_sha256`` on this
        side (not known yet: the data is not prepared) is not compared."""
        out: dict[str, list[str]] = {}
        for part in ("model", "data"):
            a, b = getattr(self, part), getattr(saved, part)
            if part == "model":
                a, b = _used_sections(a), _used_sections(b)
            a, b = _flat(a), _flat(b)
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            if keys:
                out[part] = [f"{part}.{k}: {_show(b.get(k))} -> {_show(a.get(k))}" for k in keys]
        if self.optimizer != saved.optimizer:
            out["optimizer"] = [f"optimizer.name: {saved.optimizer} -> {self.optimizer}"]
        if self.tokenizer_sha256 and self.tokenizer_sha256 != saved.tokenizer_sha256:
            out.setdefault("data", []).append(
                f"the tokenizer: sha256 {saved.tokenizer_sha256[:12]}... -> "
                f"{self.tokenizer_sha256[:12]}..."
            )
        return out


def _used_sections(model: dict) -> dict:
    """The model fields without the options sections of families whose letters the pattern
    does not use: they do not change the model, and a family registered after a checkpoint
    was written (its section absent there, at defaults here) must not refuse the resume."""
    from plait.models.common import family

    used = set()
    for c in model.get("pattern", ""):
        try:
            used.add(family.family_of(c).name)
        except KeyError:  # a letter of a family not registered here: the pattern differs
            pass
    sections = {name for name, fam in family.families().items() if fam.options is not None}
    return {k: v for k, v in model.items()
            if not (k in sections and isinstance(v, dict) and k not in used)}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value)


TOKENIZER_FIELDS = (
    "data.corpus",
    "data.prepare.text_field",
    "data.prepare.tokenizer",
    "data.prepare.tokenizer_type",
    "data.prepare.vocab_size",
    "data.prepare.special_tokens",
    "data.prepare.tokenizer_sample_docs",
)
"""Data fields that make the automatic preparation train another tokenizer (unless
``data.prepare.tokenizer`` names one): another vocabulary, which a checkpoint's embedding
cannot continue with."""


def check_fits(path: Path, meta: dict, identity: RunIdentity, allow: list[str]) -> None:
    """Refuse to resume ``path`` (its ``meta``) in a run whose identity differs, naming every
    differing field; ``allow`` (``checkpoint.allow_changes``) lifts the data check. The hint
    offered never leads to another refusal: continuing on other data is suggested only
    where the tokenizer stays."""
    saved = RunIdentity(**meta["identity"])
    diff = identity.differences(saved)
    for part in allow:
        diff.pop(part, None)
    if not diff:
        return
    lines = "; ".join(x for v in diff.values() for x in v)
    if set(diff) != {"data"}:
        hint = (
            "the model and the optimizer cannot change on resume: start a new run "
            "(another out_dir), or checkpoint.init_from for the weights alone"
        )
    elif any(x.startswith(TOKENIZER_FIELDS + ("the tokenizer",)) for x in diff["data"]):
        hint = (
            "another tokenizer would change the model's vocabulary: to continue on other "
            "data keep this run's (data.prepare.tokenizer=<its tokenizer.model>) and set "
            "checkpoint.allow_changes=[data]"
        )
    else:
        hint = "checkpoint.allow_changes=[data] continues deliberately on new data"
    raise CheckpointError(f"{path}: this run differs from the checkpoint ({lines}); {hint}")


def run_identity(cfg, tokenizer_sha256: str) -> RunIdentity:
    data = dataclasses.asdict(cfg.data)
    model = cfg.model.to_dict()
    model.pop("preset", None)  # a name; the fields it set are compared one by one
    model.pop("pipeline_marks", None)  # the layout's cut, not the model
    return RunIdentity(model, cfg.optimizer.name, data, tokenizer_sha256)


def _layout(rt, cfg) -> dict[str, int]:
    return {"tp": rt.tp, "pp": rt.pp, "cp": rt.cp, "dp": rt.dp, "world": rt.world_size,
            "zero_stage": cfg.parallel.zero_stage}
