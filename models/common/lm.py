"""The hybrid language model: embedding, one block per pattern letter, norm, output layer.

Layout [B, T, C] throughout. The vocabulary is split across TP ranks (vocab-parallel
embedding, column-parallel output layer, vocab-parallel cross entropy), so full-vocabulary
logits never exist on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.parallel.pipeline import attach_aux_loss, mark_shared_embedding
from plait.parallel.sequence import SequenceParallel
from plait.parallel.stages import Stage

from . import family
from .config import ModelConfig
from .family import Auxiliary
from .layers import make_mlp, make_norm, normal_init
from .tp_plan import check_plan

Recompute = Literal["none", "full", "selective"]
"""Activation checkpointing modes (``training.recompute``; ``Block.recomputed`` says what
each one re-runs)."""

LOSS_CHUNK = 8192
"""Tokens per row whose logits exist at once when recomputing (any ``recompute`` but none):
the output layer and cross entropy run on chunks of the sequence, each re-run in the
backward, so the [T, vocab / tp] logits, their softmax and their gradient (three times
T x vocab floats: 6 GiB at 256K tokens and vocab 2048) never exist whole."""


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
        self,
        x: torch.Tensor,
        positions_BT: torch.Tensor,
        doc_ids_BT: torch.Tensor | None = None,
        recompute: Recompute = "none",
    ) -> torch.Tensor:
        """The block, under activation checkpointing ``recompute`` (``recomputed``). Always
        entered through the module call, so hooks on a block see every forward."""
        if recompute != "none":
            return self.recomputed(x, positions_BT, doc_ids_BT, recompute)
        return self.channel(self.mix(x, positions_BT, doc_ids_BT))

    def mix(
        self, x: torch.Tensor, positions_BT: torch.Tensor, doc_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The token-mixing half, x + mixer(norm(x))."""
        return x + self.mixer(self.mixer_norm(x), positions_BT, doc_ids_BT)

    def channel(self, x: torch.Tensor) -> torch.Tensor:
        """The channel-mixing half, x + mlp(norm(x)) (x itself with ``mlp: none``)."""
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def recomputed(
        self, x: torch.Tensor, positions_BT: torch.Tensor, doc_ids_BT, mode: Recompute
    ) -> torch.Tensor:
        """``forward`` under activation checkpointing ``mode`` (``training.recompute``).

        Each half of a block (mixer with its norm, MLP with its norm) is checkpointed on its
        own: one more [T, hidden] input kept per block than checkpointing the block whole,
        and a re-run in the backward then holds one half's activations, not the block's.
        full: both halves of every block are re-run; only their inputs are kept.
        selective: every MLP half is re-run (its [T, ffn] intermediates are the bulk of a
        block), and the mixer half of letters that declare ``selective_recompute`` (the
        softmax-like mixers: their saved scores and probabilities are their largest
        activations, and their forward is one batched pass); the other letters keep their
        mixer's activations (a linear-state scan's chunk states: recomputing them would
        repeat a serial loop over chunks and, under LASP-2, its all-gather).

        Non-reentrant torch.utils.checkpoint: it restores the CPU (and CUDA) RNG state for
        the re-run, so random ops would draw the same numbers (plait's mixers have no
        dropout; megatron's tracker, which only forks per-TP-rank streams inside dropout
        regions, is not used in them), and collectives inside a half (TP's all-reduce,
        LASP-2's all-gather, halos) run again in the same order on every rank.
        """
        if mode == "full" or (
            mode == "selective" and family.letter(self.letter).selective_recompute
        ):
            x = checkpoint(self.mix, x, positions_BT, doc_ids_BT, use_reentrant=False)
        else:
            x = self.mix(x, positions_BT, doc_ids_BT)
        if mode == "none" or self.mlp is None:
            return self.channel(x)
        return checkpoint(self.channel, x, use_reentrant=False)

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
        stage: Stage | None = None,
    ):
        super().__init__()
        sp = sp or SequenceParallel()
        cfg.validate(family.catalogue())
        self.cfg = cfg
        self.stage = stage
        """The pipeline chunk this model holds (plait.parallel.stages.Stage), None: all of it.
        Every layer is still built, in order, and the others dropped: each one then draws the
        weights it gets in a single process from the same RNG stream."""
        self.vocab_size = cfg.padded_vocab_size(vocab_size)
        tp = mp.tensor_model_parallel_size
        self.vocab_split = tp > 1
        """Whether each rank holds a vocabulary shard (megatron's vocab-parallel cross
        entropy then), or all of it (torch's fused cross entropy)."""
        if self.vocab_size % tp:
            raise ValueError(
                f"model.vocab_multiple: padded vocab {self.vocab_size} is not divisible by "
                f"tensor_parallel={tp}"
            )
        self.embedding = VocabParallelEmbedding(
            self.vocab_size, cfg.hidden_size, init_method=normal_init(cfg.init_std), config=mp
        )
        self.blocks = nn.ModuleList()
        for i in range(cfg.num_layers):
            block = Block(cfg, mp, i, sp)
            if stage is None or stage.owns(i):  # keyed by the global index: logical names
                self.blocks._modules[str(i)] = block
        self.final_norm = make_norm(cfg)
        self.embed_scale = cfg.hidden_size**0.5 if cfg.embed_scale else 1.0
        self.metrics: dict[str, torch.Tensor] = {}
        self.stage_loss: torch.Tensor | None = None
        """On a pipeline chunk before the last: the part of the training loss it adds (its
        weighted auxiliary losses) in its last forward, detached, for the logged loss."""
        self.recompute: Recompute = "none"
        """Activation checkpointing of the blocks in training forwards (the launcher sets it
        from ``training.recompute``); the loss and gradients are those of "none"."""
        self.output = ColumnParallelLinear(
            cfg.hidden_size,
            self.vocab_size,
            config=mp,
            bias=False,
            gather_output=False,
            init_method=normal_init(cfg.init_std),
            skip_weight_param_allocation=cfg.tie_embeddings,
        )
        if stage is not None:
            self._keep_stage_parts(stage)

    def _keep_stage_parts(self, stage: Stage) -> None:
        """Drop what this chunk does not run: the embedding but on the first chunk (the last
        keeps it too when tied: its weight is the output layer's, kept equal by
        plait.parallel.pipeline), the final norm and output layer but on the last."""
        tied = self.cfg.tie_embeddings and stage.last
        if not stage.first and not tied:
            self.embedding = None
        if tied and not stage.first:
            mark_shared_embedding(self.embedding.weight, replica=True)
        elif tied or (stage.first and self.cfg.tie_embeddings and not stage.last):
            mark_shared_embedding(self.embedding.weight, replica=False)
        if not stage.last:
            self.final_norm = None
            self.output = None

    def forward(
        self,
        tokens_BT: torch.Tensor,
        labels_BT: torch.Tensor | None = None,
        loss_mask_BT: torch.Tensor | None = None,
        positions_BT: torch.Tensor | None = None,
        doc_ids_BT: torch.Tensor | None = None,
        hidden_BTC: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``doc_ids_BT`` marks packed documents (linear layers reset, attention is masked);
        ``positions_BT`` (rotary positions) should then restart at every document.
        ``hidden_BTC``: a pipeline chunk after the first starts from the previous chunk's
        output; a chunk before the last returns its own output."""
        if positions_BT is None:
            T = tokens_BT.shape[1]
            positions_BT = torch.arange(T, device=tokens_BT.device).expand_as(tokens_BT)
        if hidden_BTC is not None:
            x = hidden_BTC
        else:
            x = self.embedding(tokens_BT)
            if self.embed_scale != 1.0:
                x = x * self.embed_scale
        if self.recompute not in get_args(Recompute):
            raise ValueError(f"recompute: {self.recompute!r} not in {get_args(Recompute)}")
        recompute = self.recompute if torch.is_grad_enabled() else "none"
        for block in self.blocks:
            x = block(x, positions_BT, doc_ids_BT, recompute=recompute)
        if self.stage is not None and not self.stage.last:
            return self._stage_output(x)
        x = self.final_norm(x)
        if labels_BT is None:
            return self._logits(x)
        if recompute == "none":
            loss_BT = self._token_loss(x, labels_BT)
        else:  # the [T, vocab] logits never whole: a chunk at a time, re-run in the backward
            n = LOSS_CHUNK
            loss_BT = torch.cat([
                checkpoint(self._token_loss, x_c, y_c, use_reentrant=False)
                for x_c, y_c in zip(x.split(n, 1), labels_BT.split(n, 1))
            ], 1)
        if loss_mask_BT is None:
            loss = loss_BT.mean()
        else:
            mask = loss_mask_BT.to(loss_BT.dtype)
            loss = (loss_BT * mask).sum() / mask.sum().clamp_min(1.0)
        return self._add_aux(loss)

    def _logits(self, x_BTC: torch.Tensor) -> torch.Tensor:
        weight = self.embedding.weight if self.cfg.tie_embeddings else None
        logits, _ = self.output(x_BTC, weight=weight)
        return logits

    def _token_loss(self, x_BTC: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        """Cross entropy per token [B, T] of the final hidden states (vocab-parallel). With
        the whole vocabulary on the rank it is torch's fused kernel: the same values, without
        megatron's dozen full-size operators (fwd+bwd at [2048, 2048]: 20 -> 13 ms on CPU).
        A label outside the vocabulary is an error there (megatron scores it as a zero logit)."""
        logits = self._logits(x_BTC).float()
        if self.vocab_split:
            return vocab_parallel_cross_entropy(logits, labels_BT)
        loss = F.cross_entropy(logits.flatten(0, 1), labels_BT.flatten(), reduction="none",
                               ignore_index=-(2**62))
        return loss.view_as(labels_BT)

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

    def _aux_parts(self) -> dict[str, tuple[list[Auxiliary], set[str]]]:
        parts: dict[str, tuple[list[Auxiliary], set[str]]] = {}
        for block in self.blocks:
            for aux in getattr(block.mixer, "auxiliary", list)():
                auxs, letters = parts.setdefault(aux.name, ([], set()))
                auxs.append(aux)
                letters.add(block.letter)
        return parts

    def _aux_mean(self, auxs: list[Auxiliary], letters: set[str]) -> torch.Tensor:
        """The layer mean of an auxiliary; on a pipeline chunk, this chunk's share of the
        mean over every layer of the model with the letters that report it (the chunks'
        shares add up to the single-process mean)."""
        values = torch.stack([a.value for a in auxs])
        if self.stage is None:
            return values.mean()
        return values.sum() / sum(self.cfg.pattern.count(c) for c in letters)

    def _add_aux(self, lm_loss: torch.Tensor) -> torch.Tensor:
        self.metrics = {"lm_loss": lm_loss.detach()}
        loss = lm_loss
        for name, (auxs, letters) in self._aux_parts().items():
            mean = self._aux_mean(auxs, letters)
            self.metrics[name] = mean.detach()
            if auxs[0].loss_weight and self.training:  # validation reports the LM loss only
                loss = loss + auxs[0].loss_weight * mean
        return loss

    def _stage_output(self, x: torch.Tensor) -> torch.Tensor:
        """A chunk before the last: its auxiliary losses ride on its output into the backward
        pass (``attach_aux_loss``), as if added to the loss on the last stage."""
        self.metrics = {}
        self.stage_loss = None
        extra = None
        for name, (auxs, letters) in self._aux_parts().items():
            mean = self._aux_mean(auxs, letters)
            self.metrics[name] = mean.detach()
            if auxs[0].loss_weight and self.training:
                term = auxs[0].loss_weight * mean
                extra = term if extra is None else extra + term
        if extra is None:
            return x
        self.stage_loss = extra.detach()
        return attach_aux_loss(x, extra)


def build_model(
    cfg: ModelConfig,
    tensor_parallel: int,
    vocab_size: int | None = None,
    sp: SequenceParallel | None = None,
    stage: Stage | None = None,
) -> HybridLM:
    """Build the model for this rank's TP shard (and, with ``sp``, its sequence chunk; with
    ``stage``, its pipeline chunk).

    Weights are initialised from the full (unsplit) master tensor on CPU and then split
    (megatron's use_cpu_initialization), so the same seed gives the same logical weights at
    every TP size. Parameters are float32; DeepSpeed casts for bf16 training.

    Every built parameter is checked against its family's TP plan (``Letter.tp_plan``): the
    checkpoints reshard and the export maps by the plan, so a layer that splits a tensor
    otherwise is refused here, not discovered in a resumed run.
    """
    mp = ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )
    model = HybridLM(cfg, mp, vocab_size, sp, stage)
    bad = check_plan(model, cfg)
    if bad:
        raise family.RegistryError(
            f"model.pattern {cfg.pattern!r}: the built layers disagree with their families' TP "
            f"plans: {'; '.join(bad[:3])}"
        )
    return model
