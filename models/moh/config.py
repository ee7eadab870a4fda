"""MoH's options: ``model.moh.*``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from plait.models.common.config import ModelConfig, ModelConfigError


@dataclass
class MoHOptions:
    """Letter M (Mixture-of-Head attention)."""

    shared_heads: int = 2
    """Heads every token uses; the other num_heads - shared_heads are routed."""
    top_k: int = 2
    """Routed heads each token activates."""
    balance_coef: float = 0.01
    """Weight of the load-balance loss added to the training loss (the released value)."""
    gates: Literal["released", "paper"] = "released"
    """released: the released code's gate factors (2 on the shared/routed split, S on shared
    gates, k on routed gates; each active head ~1 at init); paper: without them. Learned
    router only."""
    router: Literal["learned", "query_norm"] = "learned"
    """learned: the paper's routers (SkyworkAI/MoH's ViT and DiT code: a routed-head router,
    a shared-head router and the 2-way mix, soft gates, the balance loss); query_norm:
    MoH-LLaMA3's released router, with no parameters: each token's top_k routed heads are
    those whose query has the largest L2 norm (before rotary), gates are 1 on the selected
    and the shared heads and 0 elsewhere, and there is no balance loss. MoH-LLaMA3 shares
    half the heads and selects a quarter (16 shared, top 8 of 16 routed of 32)."""

    def validate(self) -> None:
        if self.shared_heads < 0 or self.top_k < 1 or self.balance_coef < 0:
            raise ModelConfigError(
                "moh: shared_heads must be >= 0, top_k >= 1 and balance_coef >= 0, got "
                f"{self.shared_heads}, {self.top_k}, {self.balance_coef}"
            )

    def check(self, cfg: ModelConfig) -> None:
        """Against the model's head count (run when the pattern has M layers)."""
        if self.shared_heads + self.top_k > cfg.num_heads:
            raise ModelConfigError(
                f"moh: shared_heads {self.shared_heads} + top_k {self.top_k} exceeds "
                f"num_heads {cfg.num_heads}"
            )
        if self.shared_heads >= cfg.num_heads:
            raise ModelConfigError(
                f"moh.shared_heads: {self.shared_heads} of {cfg.num_heads} heads leaves "
                "no routed head"
            )
