"""Modeling code of a plait hybrid language model, for ``transformers`` with
``trust_remote_code=True``.

Plain PyTorch, importing nothing from plait: written beside the weights by
``python -m plait.launcher.export`` so that an exported model loads, generates and
evaluates anywhere transformers runs. It computes what plait's own model computes (every
export checks it: logits and a cached greedy continuation, in a process without plait).

The model is a stack of pre-norm residual blocks, one per letter of ``config.pattern``:
``x + mixer(norm(x))`` then ``x + mlp(norm(x))``. The token mixer of each letter comes from
its family: ``plait_mixers.py``, written by the export, imports each family's module
(``mixer_<family>.py``; letter A, softmax attention, is in ``plait_layers.py`` with the
pieces every letter shares) and maps letters to classes.

Generation: every mixer has one ``forward(x, positions, pad, state) -> (y, state)`` that
continues a sequence from ``state`` (None: the start). The state of a linear or SSM letter
has a fixed size (a [d, d] matrix per head, an SSM state, a convolution tail), so the cost of
a token does not grow with the context; softmax letters keep a KV cache. ``PlaitCache`` holds
one state per layer. Left-padded batches work: a padded token enters no state and is no key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_plait import PlaitConfig
from .plait_layers import GatedMLP, GeluMLP, make_norm
from .plait_mixers import MIXERS

# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class PlaitCache:
    """Per-layer decode states for ``generate``: what each letter's ``forward`` returned, the
    number of positions seen (padding included) and, per row, of real tokens (the next
    rotary position)."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[dict | None] = [None] * num_layers
        self.seen = 0
        self.real_B: torch.Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select rows (beam search): every state tensor is batch-first."""
        for state in self.layers:
            if state is not None:
                for key, t in state.items():
                    state[key] = t.index_select(0, beam_idx.to(t.device))
        if self.real_B is not None:
            self.real_B = self.real_B.index_select(0, beam_idx.to(self.real_B.device))


class PlaitBlock(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x)) (no second half with ``mlp: none``)."""

    def __init__(self, config: PlaitConfig, layer_idx: int):
        super().__init__()
        letter = config.pattern[layer_idx]
        if letter not in MIXERS:
            raise ValueError(f"pattern letter {letter!r} (layer {layer_idx}) is not implemented")
        self.input_layernorm = make_norm(config)
        self.mixer = MIXERS[letter](config, layer_idx)
        if config.mlp != "none":
            self.post_attention_layernorm = make_norm(config)
            self.mlp = GeluMLP(config) if config.mlp == "gelu" else GatedMLP(config)
        else:
            self.mlp = None

    def forward(self, x, positions_BT, pad_BT, state):
        y, state = self.mixer(self.input_layernorm(x), positions_BT, pad_BT, state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, state


class PlaitPreTrainedModel(PreTrainedModel):
    config_class = PlaitConfig
    base_model_prefix = "model"
    _no_split_modules = ["PlaitBlock"]
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(init_std) for projections and embeddings (only for weights a checkpoint
        lacks: an export holds every tensor)."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class PlaitModel(PlaitPreTrainedModel):
    def __init__(self, config: PlaitConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PlaitBlock(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.embed_multiplier = config.hidden_size**0.5 if config.embed_scale else 1.0
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: PlaitCache | None = None,
    ) -> tuple[torch.Tensor, PlaitCache]:
        """Hidden states [B, T, hidden] of T new tokens after the sequence in ``cache`` (None:
        a new one), and the cache after them. ``attention_mask`` (0 at padding, left or
        right) covers either the new tokens or the whole sequence so far."""
        B, T = input_ids.shape
        cache = cache if cache is not None else PlaitCache(len(self.layers))
        pad = None
        if attention_mask is not None and not bool(attention_mask[:, -T:].all()):
            pad = attention_mask[:, -T:] == 0
        real = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if pad is not None:
            real = (~pad).long()
        before = cache.real_B if cache.real_B is not None else real.new_zeros(B)
        positions = (before[:, None] + real.cumsum(1) - 1).clamp_min(0)
        x = self.embed_tokens(input_ids)
        if self.embed_multiplier != 1.0:
            x = x * self.embed_multiplier
        for i, layer in enumerate(self.layers):
            x, cache.layers[i] = layer(x, positions, pad, cache.layers[i])
        cache.seen += T
        cache.real_B = before + real.sum(1)
        return self.norm(x), cache


class PlaitForCausalLM(PlaitPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PlaitConfig):
        super().__init__(config)
        self.model = PlaitModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is PlaitCache, made by forward

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: PlaitCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits of the new tokens; with ``labels`` (the inputs themselves, -100 where
        ignored) also the mean next-token cross entropy."""
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        hidden, cache = self.model(input_ids, attention_mask, past_key_values)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        out = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=cache if use_cache else None
        )
        return out if return_dict is not False else out.to_tuple()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: PlaitCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """Only the tokens the cache has not seen go in (all of them at the first step)."""
        if past_key_values is not None and past_key_values.seen:
            input_ids = input_ids[:, past_key_values.seen :]
        inputs = {
            "input_ids": input_ids.contiguous(),
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if "logits_to_keep" in kwargs:
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs

    def _reorder_cache(self, past_key_values: PlaitCache, beam_idx: torch.LongTensor):
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
