"""Changing a future token changes no earlier logit, for every mixer letter and a hybrid."""

import pytest
import torch

from plait.models.common import ModelConfig, build_model
from tests.distributed import run_distributed


def _check(rt, pattern):
    cfg = ModelConfig(
        pattern=pattern,
        num_layers=len(pattern),
        hidden_size=32,
        num_heads=2,
        ffn_hidden_size=64,
        lightning_block=8,
    )
    model = build_model(cfg, 1, vocab_size=100)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 100, (2, 29), generator=g)
    with torch.no_grad():
        base = model(tokens)
        results = []
        for t in (0, 9, 17, 28):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1 + torch.arange(2)) % 100
            out = model(changed)
            results.append(
                (
                    t,
                    (out[:, :t] - base[:, :t]).abs().max().item() if t else 0.0,
                    (out[:, t:] - base[:, t:]).abs().max().item(),
                )
            )
    return results


@pytest.mark.parametrize("pattern", ["L", "A", "LALL"])
def test_future_tokens_do_not_leak(pattern):
    for t, before, after in run_distributed(_check, 1, pattern)[0]:
        assert before == 0.0, f"position {t} changed logits before it by {before}"
        assert after > 0.0, f"position {t} changed nothing at or after it (test would be vacuous)"
