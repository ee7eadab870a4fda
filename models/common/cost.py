"""The cost model: parameters, FLOPs per token and activation memory, from the config alone.

One set of formulas, used by everything that needs a model's size or cost without building
it: the parameter counts of the presets (docs/models.md, checked against built models), the
pipeline-stage balancer and the memory plan (launcher/planning.py: training cuts its stages
with it too), and the MFU of the benchmarks (benchmarks/train_step.py, gpu_check.py).

FLOPs per token are the model's matmuls, 2 x the weights a token meets (each letter's mixer
projections, the MLP, the output layer; the embedding is a lookup, norms are negligible),
plus each letter's token mixing at the sequence length (``Letter.mixing_flops``: a softmax
layer at 32K does not cost what a lightning layer does). A training step is 3x the forward
(backward = 2x forward); recomputation is not counted (the model's FLOPs, not the
hardware's).

Activation memory per block and micro-batch: 34 s b h bytes in bf16 (Korthikanti et al.
2022, attention through flash/SDPA), twice that in fp32, divided over TP x CP: one generic
estimate for every letter (the linear and SSM letters keep less: their chunk states, not
scores; an upper bound for them).
"""

from __future__ import annotations

from . import family
from .config import ModelConfig
from .layers import norm_params


def mlp_params(cfg: ModelConfig) -> int:
    """Parameters of one block's channel mixer."""
    h, f = cfg.hidden_size, cfg.ffn_size
    return {"gelu": 2 * h * f + f + h, "none": 0}.get(cfg.mlp, 3 * h * f)


def block_params(cfg: ModelConfig, layer_idx: int) -> int:
    """Parameters of block ``layer_idx``: its mixer (the letter's own formula), the MLP and
    the norms (one before each half; one in all without an MLP)."""
    mixer = family.letter(cfg.pattern[layer_idx]).mixer.param_count(cfg, layer_idx)
    norms = norm_params(cfg) * (1 if cfg.mlp == "none" else 2)
    return mixer + mlp_params(cfg) + norms


def param_count(cfg: ModelConfig, vocab_size: int | None = None) -> int:
    """Logical parameter count: embedding (padded vocabulary), output layer unless tied, every
    block, the final norm. Tests check it against built models, every preset included."""
    V = cfg.padded_vocab_size(vocab_size)
    total = V * cfg.hidden_size * (1 if cfg.tie_embeddings else 2) + norm_params(cfg)
    return total + sum(block_params(cfg, i) for i in range(len(cfg.pattern)))


def block_flops(cfg: ModelConfig, layer_idx: int, seq_len: int) -> float:
    """Forward FLOPs per token of block ``layer_idx`` at sequence length ``seq_len``: the
    letter's cost (2 x its mixer's parameters + its token mixing) and the MLP's matmuls."""
    lt = family.letter(cfg.pattern[layer_idx])
    return lt.cost(cfg, layer_idx, seq_len) + 2.0 * mlp_params(cfg)


def output_flops(cfg: ModelConfig, vocab_size: int | None = None) -> float:
    """Forward FLOPs per token of the output layer (the logits over the padded vocabulary)."""
    return 2.0 * cfg.hidden_size * cfg.padded_vocab_size(vocab_size)


def forward_flops(cfg: ModelConfig, vocab_size: int | None, lengths: list[int]) -> float:
    """Forward FLOPs per token of the whole model over packed documents of ``lengths``
    tokens (each document mixes at its own length; the mean over the tokens)."""
    T = sum(lengths)
    blocks = sum(
        sum(L * block_flops(cfg, i, L) for L in lengths) / T for i in range(len(cfg.pattern))
    )
    return blocks + output_flops(cfg, vocab_size)


def training_flops(cfg: ModelConfig, vocab_size: int | None, lengths: list[int]) -> float:
    """FLOPs per token of a training step (forward and backward: 3 x the forward)."""
    return 3.0 * forward_flops(cfg, vocab_size, lengths)


def activation_bytes(
    cfg: ModelConfig, seq_len: int, micro_batch: int, bf16: bool = True, tp: int = 1, cp: int = 1
) -> float:
    """Activation memory of one block for one micro-batch on one rank (see the module
    docstring)."""
    per_block = 34 * seq_len * micro_batch * cfg.hidden_size * (1 if bf16 else 2)
    return per_block / (tp * cp)
