"""Every family's TP plan covers every parameter and agrees with the built layers (TP=2), and
its HF-export mapping is a bijection: to_hf then from_hf gives back every tensor exactly."""

import pytest
import torch

from plait.models.common import ModelConfig, build_model, family
from plait.models.common.hf_export import from_hf, to_hf
from plait.models.common.tp_plan import check_plan
from plait.models.presets import get_preset
from plait.models.registry import SHIPPED
from plait.parallel.config import ParallelConfig
from plait.parallel.tensor_parallel import gather_full
from tests.distributed import run_distributed

TINY = [f"{f.name}-tiny" for f in SHIPPED if f.letters and f.presets]


def _mixed() -> ModelConfig:
    cfg = ModelConfig(pattern="LABWCHSM", num_layers=8, hidden_size=32, num_heads=4,
                      ffn_hidden_size=64, lrpe="first", lightning_norm="full")
    cfg.h3.state_size, cfg.seqboat.zdim, cfg.moh.shared_heads = 8, 8, 2
    return cfg


def _cfg(name):
    return _mixed() if name == "mixed" else get_preset(name)


def _plan(rt, name):
    return check_plan(build_model(_cfg(name), rt.tp, vocab_size=64), _cfg(name))


@pytest.mark.parametrize("name", TINY + ["mixed"])
def test_tp_plan_matches_layers(name):
    for bad in run_distributed(_plan, 2, name, parallel=ParallelConfig(tensor_parallel=2)):
        assert not bad, "\n".join(bad)


def _state(rt, name):
    torch.manual_seed(0)
    return gather_full(build_model(_cfg(name), 1, vocab_size=64))


@pytest.mark.parametrize("name", TINY + ["mixed"])
def test_hf_export_round_trip(name):
    state = run_distributed(_state, 1, name)[0]
    cfg = _cfg(name)
    hf = to_hf(state, cfg)
    constants = {  # fixed values the export adds (H3's B vectors), folded back on import
        f"model.layers.{i}.mixer.{c}"
        for i, letter in enumerate(cfg.pattern)
        for c in family.letter(letter).hf_export.constants
    }
    mapped = sum(v.numel() for k, v in hf.items() if k not in constants)
    assert mapped == sum(v.numel() for v in state.values())
    assert all(k.startswith(("model.", "lm_head.")) for k in hf)
    back = from_hf(hf, cfg)
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(back[k], v), k


def test_fused_projections_are_relaid_out():
    """plait's rows are [head, role, dim]; the HF layout keeps each role contiguous."""
    cfg = get_preset("transnormer-tiny")
    H, d, h = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    w = torch.arange(H * 4 * d, dtype=torch.float32)[:, None].expand(-1, h).clone()
    state = {f"blocks.{i}.mixer.proj.in_proj.weight": w for i in range(cfg.num_layers)}
    state.update({f"blocks.{i}.mixer.proj.out_proj.weight": torch.zeros(h, h)
                  for i in range(cfg.num_layers)})
    state["blocks.0.mixer.lrpe.theta"] = torch.zeros(H, 1, d)
    hf = to_hf(state, cfg)
    q, k, v, u = hf["model.layers.0.mixer.qkvu_proj.weight"][:, 0].view(4, H, d).unbind(0)
    assert torch.equal(q[1], torch.arange(4 * d, 5 * d, dtype=torch.float32))  # head 1's q
    assert torch.equal(u[0], torch.arange(3 * d, 4 * d, dtype=torch.float32))  # head 0's u


def test_unmapped_tensor_is_an_error():
    cfg = get_preset("h3-tiny")
    with pytest.raises(KeyError, match="no HF name"):
        to_hf({"blocks.0.mixer.surprise": torch.zeros(1)}, cfg)
