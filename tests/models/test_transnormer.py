"""TransNormerLLM's pieces: the decay schedule, LRPE's relative-position property, the
full-width output norm, the scaled embedding."""

import math

import pytest
import torch
from megatron.core import ModelParallelConfig

from plait.models.common import ModelConfig, build_model
from plait.models.presets import get_preset
from plait.models.transnormer.mixer import LightningAttention, alibi_slopes, transnormer_decay
from plait.parallel import lasp2
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed


def test_decay_schedule():
    assert alibi_slopes(8) == [2 ** (-(h + 1)) for h in range(8)]
    # 6 heads: the 4-head slopes, then every other one of the 8-head slopes
    assert alibi_slopes(6) == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]
    s = transnormer_decay(8, 0, 24)
    assert torch.allclose(s, torch.tensor(alibi_slopes(8)) * (1 + 1e-5))
    top = transnormer_decay(8, 23, 24)
    assert torch.allclose(top, torch.tensor(alibi_slopes(8)) * 1e-5)  # the top layer ~ no decay


def _layer_outputs(rt, shift, lrpe):
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="L", num_layers=1, hidden_size=32, num_heads=4, lightning_block=8)
    cfg.lrpe, cfg.lightning_norm = lrpe, "full"
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = LightningAttention(cfg, mp, 0, SequenceParallel())
    if m.lrpe is not None:  # frequencies large enough that positions matter at T = 21
        with torch.no_grad():
            m.lrpe.theta.uniform_(0.1, 1.0)
    x = torch.randn(2, 21, 32)
    pos = torch.arange(21).expand(2, 21)
    return m(x, pos).detach(), m(x, pos + shift).detach(), m(x, pos * 2).detach()


@pytest.mark.parametrize("shift", [5, 1000])
def test_lrpe_depends_on_relative_positions_only(shift):
    base, shifted, stretched = run_distributed(_layer_outputs, 1, shift, "all")[0]
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)
    assert (stretched - base).abs().max() > 1e-3  # positions do matter


def _norm(rt):
    torch.manual_seed(1)
    cfg = ModelConfig(pattern="L", num_layers=1, hidden_size=32, num_heads=4, lightning_block=8)
    cfg.lightning_norm = "full"
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = LightningAttention(cfg, mp, 0, SequenceParallel())
    x = torch.randn(2, 13, 32)
    pos = torch.arange(13).expand(2, 13)
    q, k, v, u = m.proj.split(x)
    o = lasp2.lightning(m.sp, torch.nn.functional.silu(q), torch.nn.functional.silu(k), v, m.slopes)
    o = o.transpose(1, 2).reshape(2, 13, 32)
    ref = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    want = m.proj.out_proj(ref * u.transpose(1, 2).reshape(2, 13, 32))[0]
    return m(x, pos).detach(), want.detach()


def test_full_width_norm_is_srmsnorm_over_all_heads():
    got, want = run_distributed(_norm, 1)[0]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _embed(rt):
    cfg = get_preset("transnormer-tiny")
    torch.manual_seed(0)
    model = build_model(cfg, 1, vocab_size=64)
    x = torch.randint(0, 64, (1, 5))
    captured = {}

    def grab(module, args):
        captured["x"] = args[0].detach()

    h = model.blocks[0].register_forward_pre_hook(grab)
    model(x)
    h.remove()
    return captured["x"], model.embedding.weight[x[0]].detach(), cfg.hidden_size


def test_embedding_is_scaled_by_sqrt_d():
    got, table, d = run_distributed(_embed, 1)[0]
    torch.testing.assert_close(got[0], table * math.sqrt(d))
