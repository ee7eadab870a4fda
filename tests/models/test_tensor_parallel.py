"""TP=2 equals TP=1: forward logits and every parameter gradient, same full weights, fp32."""

import pytest
import torch

from plait.models.common import ModelConfig, build_model
from plait.parallel.config import ParallelConfig
from tests.distributed import run_distributed
from tests.helpers import assert_tp_equal, tp_forward_backward

VOCAB = 200  # padded to 256: not a multiple of anything the layers split by except 128


def _cfg(tie: bool) -> ModelConfig:
    # The tied variant also switches to TransNormerLLM's SRMSNorm + SGLU.
    return ModelConfig(
        pattern="LALA",
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        ffn_hidden_size=96,
        lightning_block=16,
        tie_embeddings=tie,
        norm="srmsnorm" if tie else "rmsnorm",
        mlp="glu" if tie else "swiglu",
    )


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 38), generator=g)  # T=37: not a multiple of 16
    return tokens[:, :-1], tokens[:, 1:]


def _run(rt, cfg, full_state, seed):
    return tp_forward_backward(build_model(cfg, rt.tp, vocab_size=VOCAB), full_state, *_batch(seed))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_tp2_equals_tp1(tie, seed):
    cfg = _cfg(tie)
    ref = run_distributed(_run, 1, cfg, None, seed, seed=seed)[0]
    out = run_distributed(
        _run, 2, cfg, ref["state"], seed, parallel=ParallelConfig(tensor_parallel=2), seed=seed
    )
    for rank_out in out:
        assert_tp_equal(rank_out, ref)


def test_same_seed_same_logical_weights_at_any_tp():
    """use_cpu_initialization: the master tensor is drawn whole, then split."""
    cfg = _cfg(False)
    ref = run_distributed(_run, 1, cfg, None, 0, seed=7)[0]
    out = run_distributed(_run, 2, cfg, None, 0, parallel=ParallelConfig(tensor_parallel=2), seed=7)
    for name, t in ref["state"].items():
        torch.testing.assert_close(out[0]["state"][name], t, rtol=0, atol=0, msg=name)


def _options_cfg() -> ModelConfig:
    """The released-model options: MoH's query-norm router (its norms are all-gathered over
    TP), attention with biases and partial rotary, H3 with head_dim 2 (per-channel shift
    SSM), LayerNorm and the GELU MLP."""
    cfg = ModelConfig(pattern="MAH", num_layers=3, hidden_size=64, num_heads=4,
                      ffn_hidden_size=96, norm="layernorm", mlp="gelu")
    cfg.moh.router, cfg.moh.shared_heads, cfg.moh.top_k = "query_norm", 2, 1
    cfg.softmax.bias, cfg.softmax.rotary_dim = True, 8
    cfg.h3.head_dim, cfg.h3.state_size = 2, 8
    return cfg


@pytest.mark.parametrize("seed", [0, 1])
def test_tp2_equals_tp1_released_options(seed):
    cfg = _options_cfg()
    ref = run_distributed(_run, 1, cfg, None, seed, seed=seed)[0]
    out = run_distributed(
        _run, 2, cfg, ref["state"], seed, parallel=ParallelConfig(tensor_parallel=2), seed=seed
    )
    for rank_out in out:
        assert_tp_equal(rank_out, ref)
