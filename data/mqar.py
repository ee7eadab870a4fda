"""Multi-query associative recall (MQAR, from the Zoology benchmark): a synthetic recall task.

A sequence first lists ``num_pairs`` key-value pairs (keys from the lower half of the
vocabulary, values from the upper half, keys distinct), then repeats some of the keys at random
later positions, other positions holding the filler token 0. At every repeated key the model
must predict that key's value as the next token; only those positions count (``loss_mask``).
Attention solves it by looking the key up; a model whose memory is a small decaying state
(linear attention, convolutions) must compress all pairs and degrades as pairs grow -- the
reason hybrids keep a few softmax (or window) layers.
"""

from __future__ import annotations

import numpy as np
import torch


def mqar_batch(
    batch: int, seq_len: int, vocab: int, num_pairs: int, num_queries: int, seed: int
) -> dict[str, torch.Tensor]:
    """tokens, labels (next-token targets, 0 where unused) and loss_mask, all [batch, seq_len]."""
    half = vocab // 2
    if num_pairs > half - 1 or 2 * num_pairs + num_queries > seq_len:
        raise ValueError(
            f"mqar: {num_pairs} pairs and {num_queries} queries do not fit seq_len {seq_len} "
            f"with vocab {vocab}"
        )
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, seq_len), dtype=np.int64)
    labels = np.zeros((batch, seq_len), dtype=np.int64)
    mask = np.zeros((batch, seq_len), dtype=np.float32)
    for b in range(batch):
        keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
        values = rng.integers(half, vocab, size=num_pairs)
        tokens[b, 0 : 2 * num_pairs : 2] = keys
        tokens[b, 1 : 2 * num_pairs : 2] = values
        slots = rng.choice(np.arange(2 * num_pairs, seq_len), size=num_queries, replace=False)
        which = rng.integers(0, num_pairs, size=num_queries)
        tokens[b, slots] = keys[which]
        labels[b, slots] = values[which]
        mask[b, slots] = 1.0
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
    }


def mqar_accuracy(logits_BTV: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """Fraction of query positions whose argmax is the right value."""
    pred = logits_BTV.argmax(-1)
    m = batch["loss_mask"] > 0
    return (pred[m] == batch["labels"][m]).float().mean().item()
