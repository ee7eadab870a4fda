"""What a named preset is: a config factory, the published parameter count, a note."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ModelConfig


@dataclass(frozen=True)
class Preset:
    build: Callable[[], ModelConfig]
    published: float | None
    """Parameter count the paper or model card gives (None: not a published size)."""
    note: str
    """Where the config comes from, or what it is for."""
    explain: str = ""
    """Why the computed count differs from the published one by more than 2%."""
