"""Document boundaries reach every layer: a packed row gives each document exactly the logits
it gets alone (linear layers reset their state, attention is masked, positions restart)."""

import pytest
import torch

from plait.models.common import ModelConfig, build_model
from plait.models.presets import get_preset
from plait.models.registry import SHIPPED
from tests.distributed import run_distributed


def _check(rt, pattern):
    if pattern.endswith("-tiny"):
        cfg = get_preset(pattern)
    else:
        cfg = ModelConfig(
            pattern=pattern, num_layers=len(pattern), hidden_size=32, num_heads=2,
            ffn_hidden_size=64, lightning_block=8,
        )
    model = build_model(cfg, 1, vocab_size=100)
    g = torch.Generator().manual_seed(0)
    lengths = [11, 1, 20]
    tokens = torch.randint(0, 100, (1, sum(lengths)), generator=g)
    doc_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(tokens, positions_BT=positions, doc_ids_BT=doc_ids)
        unmasked = model(tokens)
        errs, start = [], 0
        for n in lengths:
            alone = model(tokens[:, start : start + n])
            errs.append((packed[:, start : start + n] - alone).abs().max().item())
            start += n
    leak = (unmasked[:, 12:] - packed[:, 12:]).abs().max().item()
    return errs, leak


TINY = [f"{f.name}-tiny" for f in SHIPPED if f.letters and f.presets]


@pytest.mark.parametrize("pattern", ["L", "A", "LAL"] + TINY)
def test_packed_documents_equal_documents_alone(pattern):
    errs, leak = run_distributed(_check, 1, pattern)[0]
    assert max(errs) < 1e-5, errs
    assert leak > 1e-3  # without the boundaries the later documents do see the earlier ones
