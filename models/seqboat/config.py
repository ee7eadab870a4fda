"""SeqBoat's options: ``model.seqboat.*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.models.common.config import ModelConfigError


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

    def value_dim(self, hidden_size: int) -> int:
        """The GAU's value / gate width: ``hdim``, or 2 * hidden_size when 0."""
        return self.hdim or 2 * hidden_size

    def validate(self) -> None:
        for name in ("ema_dim", "zdim", "window"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"seqboat.{name}: must be >= 1, got {getattr(self, name)}")
        if self.hdim < 0:
            raise ModelConfigError(f"seqboat.hdim: must be >= 0, got {self.hdim}")
        if self.zdim % 2:
            raise ModelConfigError(f"seqboat.zdim: must be even (rotary), got {self.zdim}")
