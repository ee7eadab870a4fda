"""Every family's presets by name (``model.preset`` in a run config).

Each family folder lists its published sizes, a 1B-class preset (what the Slurm templates
train) and a tiny CPU preset; ``docs/models.md`` sets the computed parameter counts beside
the published ones (``python -m plait.models.presets`` regenerates the table).
"""

from __future__ import annotations

import dataclasses

from plait.models.based.presets import PRESETS as BASED
from plait.models.common.config import ModelConfig, ModelConfigError
from plait.models.common.presets import Preset
from plait.models.h3.presets import PRESETS as H3
from plait.models.moh.presets import PRESETS as MOH
from plait.models.seqboat.presets import PRESETS as SEQBOAT
from plait.models.transnormer.presets import PRESETS as TRANSNORMER

FAMILIES: dict[str, dict[str, Preset]] = {
    "transnormer": TRANSNORMER,
    "based": BASED,
    "h3": H3,
    "seqboat": SEQBOAT,
    "moh": MOH,
}
PRESETS: dict[str, Preset] = {k: v for fam in FAMILIES.values() for k, v in fam.items()}
ONE_B = {
    "transnormer": "transnormer-1b",
    "based": "based-1.3b",
    "h3": "h3-1.3b",
    "seqboat": "seqboat-1b",
    "moh": "moh-1b",
}
"""The 1B-class preset of each family, used by the Slurm templates."""


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ModelConfigError(f"preset: {name!r} is not one of {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name].build()
    cfg.preset = name
    return cfg


def apply_preset(cfg: ModelConfig, name: str) -> None:
    """Overwrite every field of ``cfg`` with the preset's (fields given beside ``preset`` in
    a config file are applied afterwards by the loader)."""
    src = get_preset(name)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, getattr(src, f.name))
