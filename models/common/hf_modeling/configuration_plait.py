"""Configuration of a plait hybrid language model exported to the HuggingFace format.

A plait model is a stack of blocks, one per letter of ``pattern``; each letter is a token
mixer registered by a family (its module ships beside this file: ``mixer_<family>.py``)
followed by a channel mixer (``mlp``). The fields have the names and meanings of plait's
``ModelConfig`` (written by ``python -m plait.launcher.export``); each family's options are
one dict named after the family (``h3``, ``seqboat``, ...: whatever families the export's
letters come from), kept as given: transformers keeps any field it does not know as an
attribute, and ``options(family)`` reads one ({} when absent). This file imports nothing
from plait.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class PlaitConfig(PretrainedConfig):
    model_type = "plait"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        pattern: str = "LALA",
        hidden_size: int = 128,
        num_heads: int = 4,
        ffn_size: int = 384,
        mlp: str = "swiglu",
        norm: str = "rmsnorm",
        norm_eps: float = 1e-6,
        vocab_size: int = 2048,
        rope_theta: float = 10000.0,
        lightning_block: int = 64,
        lightning_norm: str = "head",
        lrpe: str = "none",
        embed_scale: bool = False,
        init_std: float = 0.02,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.pattern = pattern
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.ffn_size = ffn_size
        self.mlp = mlp
        self.norm = norm
        self.norm_eps = norm_eps
        self.vocab_size = vocab_size
        self.rope_theta = rope_theta
        self.lightning_block = lightning_block
        self.lightning_norm = lightning_norm
        self.lrpe = lrpe
        self.embed_scale = embed_scale
        self.init_std = init_std
        # the names generic HF code (lm-eval, generation utilities) looks for
        self.num_hidden_layers = len(pattern)
        self.num_attention_heads = num_heads
        kwargs.pop("num_hidden_layers", None)
        kwargs.pop("num_attention_heads", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def options(self, family: str) -> dict:
        """A family's options section ({} when the export wrote none)."""
        return getattr(self, family, None) or {}

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
