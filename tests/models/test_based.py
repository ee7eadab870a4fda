"""Based as released: the sliding-window layer of the released configs sees exactly 129 keys
(flash attention's window (256 // 2, 0): itself and 128 before it), and the presets carry the
released norm epsilon and vocabulary."""

import pytest
import torch
from megatron.core import ModelParallelConfig

from plait.models.based.mixer import SlidingWindowAttention
from plait.models.common import ModelConfig
from plait.models.presets import get_preset
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed


def _reach(rt, window, seed):
    """For query i = 200, which earlier tokens change its output when perturbed."""
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="W", num_layers=1, hidden_size=32, num_heads=2)
    cfg.based.window = window
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float64)
    m = SlidingWindowAttention(cfg, mp, 0, SequenceParallel()).double()
    T, i = 260, 200
    x = torch.randn(1, T, 32, dtype=torch.float64)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        base = m(x, pos)[0, i]
        seen = []
        for j in range(i + 1):
            xj = x.clone()
            xj[0, j] += 1.0
            if (m(xj, pos)[0, i] - base).abs().max() > 1e-12:
                seen.append(j)
    return seen


@pytest.mark.parametrize("seed", [0, 1])
def test_released_window_sees_exactly_129_keys(seed):
    seen = run_distributed(_reach, 1, 129, seed)[0]
    assert seen == list(range(200 - 128, 201)), (seen[:3], len(seen))


def test_based_presets_carry_the_released_settings():
    for name in ("based-360m", "based-1.3b"):
        cfg = get_preset(name)
        assert cfg.based.window == 129 and cfg.norm_eps == 1e-5
        assert cfg.padded_vocab_size() == 50264  # GPT-2's 50257 padded to a multiple of 8
