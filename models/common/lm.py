"""The hybrid language model: embedding, one block per pattern letter, norm, output layer.

Layout [B, T, C] throughout. The vocabulary is split across TP ranks (vocab-parallel
embedding, column-parallel output layer, vocab-parallel cross entropy), so full-vocabulary
logits never exist on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn

from plait.parallel.sequence import SequenceParallel

from . import family
from .config import ModelConfig
from .family import Auxiliary
from .layers import make_mlp, make_norm, norm_params, normal_init


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (no second half
    with ``mlp: none``)."""

    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        self.letter = cfg.pattern[layer_idx]
        self.mixer_norm = make_norm(cfg)
        self.mixer = family.letter(self.letter).mixer(cfg, mp, layer_idx, sp)
        self.mlp = make_mlp(cfg, mp)
        self.mlp_norm = make_norm(cfg) if self.mlp is not None else None

    def forward(
        self, x: torch.Tensor, positions_BT: torch.Tensor, doc_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), positions_BT, doc_ids_BT)
        if self.mlp is None:
            return x
        return x + self.mlp(self.mlp_norm(x))

    def decode(
        self, x: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """``forward`` continued from the mixer's decode state (family.py's contract)."""
        y, state = self.mixer.decode(self.mixer_norm(x), positions_BT, state)
        x = x + y
        if self.mlp is None:
            return x, state
        return x + self.mlp(self.mlp_norm(x)), state


@dataclass
class DecodeCache:
    """What ``HybridLM.decode`` carries between calls: tokens seen so far and each layer's
    decode state (constant-size for linear and SSM letters, growing for softmax ones)."""

    seen: int = 0
    layers: list[dict | None] = field(default_factory=list)


class HybridLM(nn.Module):
    """Decoder-only hybrid LM.

    ``forward(tokens)`` returns this rank's vocab shard of the logits [B, T, V/tp];
    ``forward(tokens, labels, loss_mask)`` returns the loss (a scalar, identical on every TP
    rank): the mean token cross entropy, plus, in training mode only, each auxiliary loss the
    mixers declare (``auxiliary()``, e.g. MoH's balance loss) averaged over its layers times
    its weight. ``metrics`` then holds the parts (detached tensors, read when logging:
    ``lm_loss`` and every auxiliary by name, e.g. ``moh_balance``, ``seqboat_active``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        mp: ModelParallelConfig,
        vocab_size: int | None = None,
        sp: SequenceParallel | None = None,
    ):
        super().__init__()
        sp = sp or SequenceParallel()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = cfg.padded_vocab_size(vocab_size)
        tp = mp.tensor_model_parallel_size
        if self.vocab_size % tp:
            raise ValueError(
                f"model.vocab_multiple: padded vocab {self.vocab_size} is not divisible by "
                f"tensor_parallel={tp}"
            )
        self.embedding = VocabParallelEmbedding(
            self.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std), config=mp
        )
        self.blocks = nn.ModuleList(Block(cfg, mp, i, sp) for i in range(cfg.num_layers))
        self.final_norm = make_norm(cfg)
        self.embed_scale = cfg.hidden_size**0.5 if cfg.embed_scale else 1.0
        self.metrics: dict[str, torch.Tensor] = {}
        self.output = ColumnParallelLinear(
            cfg.hidden_size,
            self.vocab_size,
            config=mp,
            bias=False,
            gather_output=False,
            init_method=normal_init(cfg.init_std),
            skip_weight_param_allocation=cfg.tie_embeddings,
        )

    def forward(
        self,
        tokens_BT: torch.Tensor,
        labels_BT: torch.Tensor | None = None,
        loss_mask_BT: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``doc_ids_BT`` marks packed documents (linear layers reset, attention is masked);
        ``positions_BT`` (rotary positions) should then restart at every document."""
        if positions_BT is None:
            T = tokens_BT.shape[1]
            positions_BT = torch.arange(T, device=tokens_BT.device).expand_as(tokens_BT)
        x = self.embedding(tokens_BT)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        for block in self.blocks:
            x = block(x, positions_BT, doc_ids_BT)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x, weight=weight)
        if labels_BT is None:
            return logits
        loss_BT = vocab_parallel_cross_entropy(logits.float(), labels_BT)
        if loss_mask_BT is None:
            loss = loss_BT.mean()
        else:
            mask = loss_mask_BT.to(loss_BT.dtype)
            loss = (loss_BT * mask).sum() / mask.sum().clamp_min(1.0)
        return self._add_aux(loss)

    def decode(
        self, tokens_BT: torch.Tensor, cache: DecodeCache | None = None
    ) -> tuple[torch.Tensor, DecodeCache]:
        """Logits (this rank's vocab shard) of T new tokens that continue the sequence held
        by ``cache`` (None: a new sequence), and the cache after them: prefill with the
        prompt, then one token at a time. Equals ``forward`` over the whole sequence
        (tests/models/test_decode.py); one sequence per row, no packed documents."""
        cache = cache or DecodeCache(0, [None] * len(self.blocks))
        T = tokens_BT.shape[1]
        positions = torch.arange(cache.seen, cache.seen + T, device=tokens_BT.device)
        positions = positions.expand_as(tokens_BT)
        x = self.embedding(tokens_BT)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        states = []
        for block, state in zip(self.blocks, cache.layers, strict=True):
            x, state = block.decode(x, positions, state)
            states.append(state)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x, weight=weight)
        return logits, DecodeCache(cache.seen + T, states)

    @torch.no_grad()
    def greedy(self, prompt_BT: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation [B, new_tokens] of the prompt by prefill and decode steps
        (one TP rank: the logits must hold the whole vocabulary)."""
        logits, cache = self.decode(prompt_BT)
        out = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits, cache = self.decode(nxt, cache)
        return torch.cat(out, 1)

    def _add_aux(self, lm_loss: torch.Tensor) -> torch.Tensor:
        self.metrics = {"lm_loss": lm_loss.detach()}
        parts: dict[str, list[Auxiliary]] = {}
        for block in self.blocks:
            for aux in getattr(block.mixer, "auxiliary", list)():
                parts.setdefault(aux.name, []).append(aux)
        loss = lm_loss
        for name, auxs in parts.items():
            mean = torch.stack([a.value for a in auxs]).mean()
            self.metrics[name] = mean.detach()
            if auxs[0].loss_weight and self.training:  # validation reports the LM loss only
                loss = loss + auxs[0].loss_weight * mean
        return loss


def param_count(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Logical parameter count derived from the config alone (no model is built): embedding
    (padded vocabulary), output layer unless tied, per block the mixer's own formula
    (``param_count`` of its class), the channel mixer and the norms, and the final norm.
    Tests check it against the parameters of built models, including every preset."""
    h, f, V = cfg.hidden_size, cfg.ffn_size, cfg.padded_vocab_size(vocab_size)
    norm = norm_params(cfg)
    mlp = {"gelu": 2 * h * f + f + h, "none": -norm}.get(cfg.mlp, 3 * h * f)  # none: no norm
    total = V * h * (1 if cfg.tie_embeddings else 2) + norm
    for i, letter in enumerate(cfg.pattern):
        total += family.letter(letter).mixer.param_count(cfg, i) + mlp + 2 * norm
    return total


def build_model(
    cfg: ModelConfig,
    tensor_parallel: int,
    vocab_size: int | None = None,
    sp: SequenceParallel | None = None,
) -> HybridLM:
    """Build the model for this rank's TP shard (and, with ``sp``, its sequence chunk).

    Weights are initialised from the full (unsplit) master tensor on CPU and then split
    (megatron's use_cpu_initialization), so the same seed gives the same logical weights at
    every TP size. Parameters are float32; DeepSpeed casts for bf16 training.
    """
    mp = ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )
    return HybridLM(cfg, mp, vocab_size, sp)
