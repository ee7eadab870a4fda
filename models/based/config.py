"""Based's options: ``model.based.*``."""

from __future__ import annotations

from dataclasses import dataclass

from plait.models.common.config import ModelConfigError


@dataclass
class BasedOptions:
    """Letters B (Taylor linear attention), W (sliding window) and C (gated short conv)."""

    feature_dim: int = 16
    """Per-head q/k dimension fed to the 2nd-order Taylor feature map (153 features at 16)."""
    window: int = 64
    """Keys a W layer's query sees, itself included (the released layer's window 256 is
    flash attention's (128, 0): 129 keys; the presets say 129)."""
    conv_kernel: int = 3
    """Kernel size of the depthwise causal convolution of C layers."""
    conv_expand: int = 4
    """C layers project hidden -> conv_expand * hidden / 2 channels for each of the conv and
    gate halves (the reference BaseConv's expand_proj; 4 in the published configs)."""
    eps: float = 1e-6
    """Added to the linear attention's normaliser."""

    def validate(self) -> None:
        for name in ("feature_dim", "window", "conv_kernel", "conv_expand"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"based.{name}: must be >= 1, got {getattr(self, name)}")
