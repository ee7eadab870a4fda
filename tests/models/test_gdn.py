"""Gated DeltaNet as released in Qwen3.5 (models/gdn): plait's mixers with weights copied
from transformers' own ``Qwen3_5GatedDeltaNet`` and ``Qwen3_5Attention`` compute what they
compute; a whole tiny ``Qwen3_5ForCausalLM`` imported into plait (models/gdn/qwen35.py) gives
its logits; exported back to the native layout, transformers loads it without remote code in
a process that cannot import plait, its logits equal plait's and its cached greedy generation
equals its uncached one. Every released text size has transformers' parameter count.

Tolerances (fp32): relative Frobenius 1e-5 for a mixer, max abs 1e-4 for logits. Two seeds;
T = 37 and 70 (not multiples of the 64-token chunk)."""

from __future__ import annotations

import pytest
import torch

from plait.models.gdn import qwen35
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close
from tests.models.native import (
    assert_native_equal,
    load_natively,
    perturb_release,
    plait_model,
)

SMALL = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
    linear_conv_kernel_dim=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    tie_word_embeddings=False, rms_norm_eps=1e-6,
)


def release_model(seed: int, **over):
    """A tiny Qwen3_5ForCausalLM whose every weight is off its init (the zero-centred norms
    included, so that their 1 + w convention is exercised)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    return perturb_release(Qwen3_5ForCausalLM(Qwen3_5TextConfig(**{**SMALL, **over})), seed)


def _import(hf_model):
    cfg = qwen35.config_from_hf(hf_model.config.to_dict(), "test")
    return cfg, qwen35.from_hf(dict(hf_model.state_dict()), cfg)


def _compare(rt, seed: int, T: int):
    hf = release_model(seed)
    cfg, state = _import(hf)
    model = plait_model(cfg, state)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 64, generator=g)
    pos = torch.arange(T)[None].expand(2, T)
    tokens = torch.randint(0, 101, (2, T), generator=g)
    with torch.no_grad():
        out = {"G": (model.blocks[0].mixer(x, pos), hf.model.layers[0].linear_attn(x))}
        cos_sin = hf.model.rotary_emb(x, pos)
        ref_q, _ = hf.model.layers[3].self_attn(x, cos_sin, None)
        out["Q"] = (model.blocks[3].mixer(x, pos), ref_q)
        out["logits"] = (model(tokens)[..., :101], hf(tokens).logits)
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [37, 70])
def test_mixers_and_model_equal_the_release(seed, T):
    out = run_distributed(_compare, 1, seed, T)[0]
    assert_rel_close(*out["G"], 1e-5, "Gated DeltaNet mixer")
    assert_rel_close(*out["Q"], 1e-5, "gated attention")
    mine, ref = out["logits"]
    assert (mine - ref).abs().max() < 1e-4


def test_conversion_is_exact_both_ways():
    """from_hf then to_hf gives back every tensor of the release, and nothing else."""
    hf = release_model(2, tie_word_embeddings=True)
    cfg, state = _import(hf)
    assert cfg.pattern == "GGGQ" and cfg.tie_embeddings
    back = qwen35.to_hf(state, cfg)
    ref = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert sorted(back) == sorted(ref)
    for k, v in ref.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-6, msg=k)
    assert qwen35.config_to_hf(cfg, 101)["layer_types"] == SMALL["layer_types"]


def test_vision_language_checkpoints_give_their_text_model():
    """A released directory is a Qwen3_5ForConditionalGeneration: text tensors under
    model.language_model., a vision tower and an MTP layer, which the import leaves out."""
    hf = release_model(3)
    cfg, state = _import(hf)
    vlm = {("model.language_model." + k[6:] if k.startswith("model.") else k): v
           for k, v in hf.state_dict().items()}
    vlm["model.visual.patch_embed.proj.weight"] = torch.zeros(3)
    vlm["mtp.fc.weight"] = torch.zeros(3)
    config = {"model_type": "qwen3_5", "tie_word_embeddings": False,
              "text_config": hf.config.to_dict()}
    cfg2 = qwen35.config_from_hf(config, "vlm")
    assert cfg2.to_dict() == cfg.to_dict()
    state2 = qwen35.from_hf(vlm, cfg2)
    assert sorted(state2) == sorted(state)


def test_released_sizes_have_the_released_parameter_counts():
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    from plait.models.common import param_count
    from plait.models.presets import get_preset

    for name in ("qwen3.5-0.8b", "qwen3.5-2b", "qwen3.5-4b", "qwen3.5-9b", "qwen3.5-27b"):
        cfg = get_preset(name)
        fields = qwen35.config_to_hf(cfg, cfg.vocab_size)
        with torch.device("meta"):
            ref = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**{
                k: v for k, v in fields.items() if k not in ("model_type", "architectures")
            }))
        assert param_count(cfg, cfg.vocab_size) == sum(p.numel() for p in ref.parameters()), name


def test_native_export_loads_in_transformers_without_plait(tmp_path):
    got = load_natively(tmp_path, "gdn-tiny", qwen35.NATIVE, 101)
    assert_native_equal(got, "Qwen3_5ForCausalLM")


def test_only_g_and_q_patterns_export_natively():
    """The export takes Qwen3_5ForCausalLM's layout when the class can express the model;
    a hybrid with other families' letters keeps plait's own layout and modeling code."""
    from plait.launcher.convert import native_layout
    from plait.models.common import ModelConfig
    from plait.models.presets import get_preset

    assert native_layout(get_preset("gdn-tiny")) is qwen35.NATIVE
    assert native_layout(get_preset("qwen3.5-0.8b")) is qwen35.NATIVE
    mixed = ModelConfig(pattern="LGQA", num_layers=4)
    assert native_layout(mixed) is None
    assert "not Qwen3.5 layers" in qwen35.fits(mixed)
    gelu = get_preset("gdn-tiny")
    gelu.mlp = "gelu"
    assert native_layout(gelu) is None
