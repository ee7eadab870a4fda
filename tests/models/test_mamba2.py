"""Mamba-2 hybrids as released in Bamba (models/mamba2): plait's mixers with weights copied
from transformers' own ``BambaMixer`` and ``BambaAttention`` compute what they compute; a
whole tiny ``BambaForCausalLM`` imported into plait (models/mamba2/bamba.py) gives its logits;
exported back to the native layout, transformers loads it without remote code in a process
that cannot import plait, its logits equal plait's and its cached greedy generation equals
its uncached one. Bamba-9B has transformers' parameter count. TP=2 equals TP=1 with one group
of B and C spread over both ranks (replicated B/C, the gated norm's group summed over TP).

Tolerances (fp32): relative Frobenius 1e-5 for a mixer, max abs 1e-4 for logits. Two seeds;
T = 37 and 70 (not multiples of the 16-token chunk of the release model here); one seed with
projection biases and a dt limit, one with two groups."""

from __future__ import annotations

import pytest
import torch

from plait.models.mamba2 import bamba
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close, assert_tp_equal, tp_forward_backward
from tests.models.native import (
    assert_native_equal,
    load_natively,
    perturb_release,
    plait_model,
)

VOCAB = 101
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8,
    mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    mamba_chunk_size=16, tie_word_embeddings=False, rms_norm_eps=1e-5,
)
VARIANTS = {  # seed -> config overrides
    0: {},
    1: dict(mamba_proj_bias=True, mamba_n_groups=1, time_step_limit=(0.05, 0.8)),
}


def release_model(seed: int, **over):
    """A tiny BambaForCausalLM whose every weight is off its init (A_log, D, dt_bias and
    the norms included)."""
    from transformers import BambaConfig, BambaForCausalLM

    torch.manual_seed(seed)
    return perturb_release(BambaForCausalLM(BambaConfig(**{**SMALL, **over})), seed)


def _import(hf_model):
    cfg = bamba.config_from_hf(hf_model.config.to_dict(), "test")
    return cfg, bamba.from_hf(dict(hf_model.state_dict()), cfg)


def _compare(rt, seed: int, T: int):
    hf = release_model(seed, **VARIANTS[seed])
    cfg, state = _import(hf)
    model = plait_model(cfg, state)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 64, generator=g)
    pos = torch.arange(T)[None].expand(2, T)
    tokens = torch.randint(0, VOCAB, (2, T), generator=g)
    with torch.no_grad():
        out = {"D": (model.blocks[0].mixer(x, pos), hf.model.layers[0].mamba(x))}
        cos_sin = hf.model.rotary_emb(x, pos)
        ref_r, _ = hf.model.layers[1].self_attn(x, cos_sin, None)
        out["R"] = (model.blocks[1].mixer(x, pos), ref_r)
        out["logits"] = (model(tokens)[..., :VOCAB], hf(tokens).logits)
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [37, 70])
def test_mixers_and_model_equal_the_release(seed, T):
    out = run_distributed(_compare, 1, seed, T)[0]
    assert_rel_close(*out["D"], 1e-5, "Mamba-2 mixer")
    assert_rel_close(*out["R"], 1e-5, "grouped attention")
    mine, ref = out["logits"]
    assert (mine - ref).abs().max() < 1e-4


@pytest.mark.parametrize("seed", [0, 1])
def test_conversion_is_exact_both_ways(seed):
    """from_hf then to_hf gives back every tensor of the release, and nothing else."""
    hf = release_model(seed, **VARIANTS[seed])
    cfg, state = _import(hf)
    assert cfg.pattern == "DRDD"
    assert (cfg.mamba2.dt_min, cfg.mamba2.dt_max) == ((0.0, 0.0) if seed == 0 else (0.05, 0.8))
    back = bamba.to_hf(state, cfg)
    ref = dict(hf.state_dict())
    assert sorted(back) == sorted(ref)
    for k, v in ref.items():
        assert torch.equal(back[k], v), k
    fields = bamba.config_to_hf(cfg, VOCAB)
    assert fields["attn_layer_indices"] == [1] and fields["mamba_expand"] == 2


def test_released_size_has_the_released_parameter_count():
    from transformers import BambaConfig, BambaForCausalLM

    from plait.models.common import param_count
    from plait.models.presets import get_preset

    cfg = get_preset("bamba-9b")
    fields = bamba.config_to_hf(cfg, cfg.vocab_size)
    with torch.device("meta"):
        ref = BambaForCausalLM(BambaConfig(**{
            k: v for k, v in fields.items() if k not in ("model_type", "architectures")
        }))
    count = sum(p.numel() for p in ref.parameters())
    assert param_count(cfg, cfg.vocab_size) == count == 9_780_235_392


def _tp_run(rt, full_state, seed):
    from plait.models.common import build_model
    from plait.models.presets import get_preset

    cfg = get_preset("mamba2-tiny")
    cfg.mamba2.groups = 1  # one group for 8 heads: B, C and the norm group span both ranks
    cfg.mamba2.proj_bias = True
    model = build_model(cfg, rt.tp, vocab_size=VOCAB)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(seed))
    return tp_forward_backward(model, full_state, tokens[:, :-1], tokens[:, 1:])


def test_tp2_equals_tp1_with_one_group_across_ranks():
    from plait.parallel.config import ParallelConfig

    ref = run_distributed(_tp_run, 1, None, 0, seed=0)[0]
    for out in run_distributed(
        _tp_run, 2, ref["state"], 0, parallel=ParallelConfig(tensor_parallel=2), seed=0
    ):
        assert_tp_equal(out, ref, "mamba2 TP=2")


def test_native_export_loads_in_transformers_without_plait(tmp_path):
    got = load_natively(tmp_path, "mamba2-tiny", bamba.NATIVE, VOCAB)
    assert_native_equal(got, "BambaForCausalLM")


def test_only_d_and_r_patterns_export_natively():
    """The export takes BambaForCausalLM's layout when the class can express the model; a
    hybrid with other families' letters keeps plait's own layout and modeling code."""
    from plait.launcher.convert import native_layout
    from plait.models.common import ModelConfig
    from plait.models.presets import get_preset

    assert native_layout(get_preset("mamba2-tiny")) is bamba.NATIVE
    assert native_layout(get_preset("bamba-9b")) is bamba.NATIVE
    mixed = ModelConfig(pattern="LDRA", num_layers=4)
    assert native_layout(mixed) is None
    assert "not Bamba layers" in bamba.fits(mixed)
    odd = get_preset("mamba2-tiny")
    odd.mamba2.head_dim = 12  # 8 x 12 = 96: not a whole multiple of hidden 64
    assert native_layout(odd) is None and "mamba_expand" in bamba.fits(odd)
