"""SeqBoat's options: ``model.seqboat.*``.

The defaults are what the authors' released LM code (renll/SeqBoat, fairseq's ``slag_lm``
with the enwik8 script's flags) computes: biases on every projection, an exact sliding
window of 1025 compressed keys (``--decoder-chunk-size 1024``), the EMA kernel cut at 2048
taps (``--truncation-length``) and the router's initial temperature 0.3 sqrt(hidden)
(``--init-temp-scale``). docs/fidelity/seqboat.md has the citations.
"""

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
    window: int = 1025
    """Keys each active query sees, itself included, counted in compressed (active) tokens:
    query i sees keys i - window + 1 .. i (the project's convention, as Based's W). The
    released code's chunk size c gives c + 1 keys (its mask keeps j in [i - c, i]), so its
    enwik8 chunk of 1024 is window 1025."""
    ema_truncation: int = 2048
    """Taps of the EMA kernel: min(ema_truncation, sequence length), zero beyond (the
    released LM default); 0 keeps the whole length. Only matters past 2048 tokens."""
    router_temperature: float = 0.3
    """Initial router temperature in units of sqrt(hidden_size): the learned log-temperature
    starts at log(router_temperature * sqrt(hidden_size)). The released default is 0.3; its
    enwik8 script passes 1.0. The argmax decision does not depend on it; the gate p_1 and
    the router's gradient (proportional to 1 / temperature) do."""
    bias: bool = True
    """Biases on every projection (z, r, v; router logits and hx; W_h), zero at init, as
    released."""
    router: Literal["learned", "on", "off"] = "learned"
    """learned: the SMA router decides; on / off force every token active / inactive (tests)."""

    def value_dim(self, hidden_size: int) -> int:
        """The GAU's value / gate width: ``hdim``, or 2 * hidden_size when 0."""
        return self.hdim or 2 * hidden_size

    def validate(self) -> None:
        for name in ("ema_dim", "zdim", "window"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"seqboat.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("hdim", "ema_truncation"):
            if getattr(self, name) < 0:
                raise ModelConfigError(f"seqboat.{name}: must be >= 0, got {getattr(self, name)}")
        if self.zdim % 2:
            raise ModelConfigError(f"seqboat.zdim: must be even (rotary), got {self.zdim}")
        if not self.router_temperature > 0:
            raise ModelConfigError(
                f"seqboat.router_temperature: must be > 0, got {self.router_temperature}"
            )
