"""H3's options: ``model.h3.*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.models.common.config import ModelConfigError


@dataclass
class H3Options:
    """Letter H (H3: shift SSM on k, diagonal SSM on k*v, multiplicative gates)."""

    state_size: int = 64
    """SSM state size N (the diagonal SSM keeps N/2 complex conjugate pairs)."""
    head_dim: int = 1
    """Per-head dimension of the k v^T outer product (1 = elementwise k * v, H3's default)."""
    ssm_lr_cap: float = 1e-3
    """SSM parameters train at min(ssm_lr_cap, optimizer.lr), without weight decay."""
    discretisation: Literal["bilinear", "zoh"] = "bilinear"
    """How the diagonal SSM turns dt and A into A_bar, B_bar: bilinear is what H3's released
    S4D kernel computes (its default; no released config overrides it), zoh (zero-order
    hold) is the S4D paper's. The kernel, the step form and the SP state passing all follow."""

    def validate(self) -> None:
        if self.state_size < 2 or self.state_size % 2:
            raise ModelConfigError(f"h3.state_size: must be even and >= 2, got {self.state_size}")
        if self.head_dim < 1:
            raise ModelConfigError(f"h3.head_dim: must be >= 1, got {self.head_dim}")
        if self.ssm_lr_cap <= 0:
            raise ModelConfigError(f"h3.ssm_lr_cap: must be > 0, got {self.ssm_lr_cap}")
