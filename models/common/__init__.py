"""Building blocks shared by every model family, the family catalogue, and the hybrid LM."""

from .config import ModelConfig, ModelConfigError
from .family import Auxiliary, Family, Letter, SequenceParallelForm, letter, letters, register
from .lm import Block, HybridLM, build_model, param_count

__all__ = [
    "Auxiliary",
    "Block",
    "Family",
    "HybridLM",
    "Letter",
    "ModelConfig",
    "ModelConfigError",
    "SequenceParallelForm",
    "build_model",
    "letter",
    "letters",
    "param_count",
    "register",
]
