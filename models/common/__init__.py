"""Building blocks shared by every model family, the family catalogue, and the hybrid LM."""

from .config import ModelConfig, ModelConfigError
from .cost import param_count
from .family import Auxiliary, Family, Letter, LetterDoc, Mixer, letter, letters, register
from .lm import Block, HybridLM, build_model

__all__ = [
    "Auxiliary",
    "Block",
    "Family",
    "HybridLM",
    "Letter",
    "ModelConfig",
    "ModelConfigError",
    "LetterDoc",
    "Mixer",
    "build_model",
    "letter",
    "letters",
    "param_count",
    "register",
]
