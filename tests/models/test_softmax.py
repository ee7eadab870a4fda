"""Letter A's options against attention written from the formulas: biases on q/k/v/out
(flash-attn's MHA in H3's released models), no positions, or rotary on the first
``rotary_dim`` dims of each head (the 2.7B H3's 64 of 128); and the released H3 presets'
attention placement. LayerNorm blocks and blocks without a channel mixer are checked here
too (the norms and MLPs those presets use)."""

import math

import pytest
import torch
from megatron.core import ModelParallelConfig

from plait.models.common import ModelConfig, build_model, param_count
from plait.models.common.mixers import SoftmaxAttention
from plait.models.presets import get_preset
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

T, HID, HEADS = 13, 32, 2


def reference(m: SoftmaxAttention, x, rotary_dim: int):
    """Float64: per-role projections with biases, NeoX rotary on the first rotary_dim dims
    (pairs (i, i + r/2)), causal softmax, output projection with bias."""
    x = x.double()
    d = HID // HEADS
    w = m.proj.in_proj.weight.double().view(HEADS, 3, d, HID)
    b = m.proj.in_proj.bias
    b = b.double().view(HEADS, 3, d) if b is not None else torch.zeros(HEADS, 3, d).double()
    q, k, v = (torch.einsum("btc,hdc->bhtd", x, w[:, r]) + b[None, :, r, None] for r in range(3))
    if rotary_dim:
        r = rotary_dim
        inv = 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # [T, r/2]
        cos, sin = ang.cos(), ang.sin()

        def rot(t):
            a, bb, rest = t[..., : r // 2], t[..., r // 2 : r], t[..., r:]
            return torch.cat([a * cos - bb * sin, bb * cos + a * sin, rest], -1)

        q, k = rot(q), rot(k)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], T, HID)
    out = o @ m.proj.out_proj.weight.double().t()
    if m.proj.out_proj.bias is not None:
        out = out + m.proj.out_proj.bias.double()
    return out


def _compare(rt, bias, rotary, rotary_dim, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="A", num_layers=1, hidden_size=HID, num_heads=HEADS)
    cfg.softmax.bias, cfg.softmax.rotary, cfg.softmax.rotary_dim = bias, rotary, rotary_dim
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = SoftmaxAttention(cfg, mp, 0, SequenceParallel())
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_()  # zero at init: make the biases count
    x = torch.randn(2, T, HID)
    pos = torch.arange(T).expand(2, T)
    r = (rotary_dim or HID // HEADS) if rotary else 0
    return (
        m(x, pos).detach(),
        reference(m, x, r),
        SoftmaxAttention.param_count(cfg, 0),
        sum(p.numel() for p in m.parameters()),
    )


@pytest.mark.parametrize(
    "bias,rotary,rotary_dim",
    [(False, True, 0), (True, False, 0), (True, True, 6), (False, True, 4)],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_options_match_formulas(bias, rotary, rotary_dim, seed):
    ours, ref, counted, built = run_distributed(_compare, 1, bias, rotary, rotary_dim, seed)[0]
    assert_rel_close(ours, ref, 1e-5, "output")
    assert counted == built


def test_released_h3_presets_place_attention_as_the_checkpoints():
    expect = {
        "h3-125m": ((6,), 0),
        "h3-355m": ((8, 16), 0),
        "h3-1.3b": ((8, 16), 0),
        "h3-2.7b": ((10, 21), 64),
        "h3-2.7b-3attn": ((8, 16, 24), 0),
    }
    for name, (attn, rdim) in expect.items():
        cfg = get_preset(name)
        assert tuple(i for i, c in enumerate(cfg.pattern) if c == "A") == attn, name
        assert cfg.softmax.bias and cfg.norm == "layernorm" and cfg.norm_eps == 1e-5, name
        assert cfg.softmax.rotary == (rdim > 0) and cfg.softmax.rotary_dim == rdim, name
        assert cfg.padded_vocab_size() == 50264, name


def _blocks(rt, norm, mlp):
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="AA", num_layers=2, hidden_size=HID, num_heads=HEADS, norm=norm,
                      mlp=mlp, norm_eps=1e-5, vocab_size=64, vocab_multiple=8)
    model = build_model(cfg, 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_()
    x = torch.randn(2, T, HID)
    blk = model.blocks[0]
    y = blk.mixer_norm(x)
    ref = torch.nn.functional.layer_norm(
        x.double(), (HID,), blk.mixer_norm.weight.double(), blk.mixer_norm.bias.double(), 1e-5
    )
    names = {n for n, _ in model.named_parameters()}
    return y.detach(), ref, names, param_count(cfg), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("mlp", ["gelu", "none"])
def test_layernorm_and_no_mlp(mlp):
    y, ref, names, counted, built = run_distributed(_blocks, 1, "layernorm", mlp)[0]
    assert_rel_close(y, ref, 1e-6, "layernorm")
    assert counted == built
    assert ("blocks.0.mlp.w1.weight" in names) == (mlp != "none")
    assert ("blocks.0.mlp_norm.weight" in names) == (mlp != "none")
