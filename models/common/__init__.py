"""Building blocks shared by every model family, and the hybrid LM itself."""

from .config import ModelConfig, ModelConfigError
from .lm import Block, HybridLM, build_model, param_count
from .pattern import MixerSpec, mixers

__all__ = [
    "Block",
    "HybridLM",
    "MixerSpec",
    "ModelConfig",
    "ModelConfigError",
    "build_model",
    "mixers",
    "param_count",
]
