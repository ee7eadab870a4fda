"""TP=2 equals TP=1: forward logits and every parameter gradient, same full weights, fp32."""

import pytest
import torch

from plait.models.common import ModelConfig, build_model
from plait.parallel.config import ParallelConfig
from plait.parallel.tensor_parallel import gather_full, gather_vocab_logits, load_full_state
from tests.distributed import run_distributed

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
    model = build_model(cfg, rt.tp, vocab_size=VOCAB)
    if full_state is not None:
        load_full_state(model, full_state)
    x, y = _batch(seed)
    logits = gather_vocab_logits(model(x))
    loss = model(x, y)
    loss.backward()
    return {
        "state": gather_full(model),
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": gather_full(model, grads=True),
    }


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_tp2_equals_tp1(tie, seed):
    cfg = _cfg(tie)
    ref = run_distributed(_run, 1, cfg, None, seed, seed=seed)[0]
    out = run_distributed(
        _run, 2, cfg, ref["state"], seed, parallel=ParallelConfig(tensor_parallel=2), seed=seed
    )
    for rank_out in out:
        torch.testing.assert_close(rank_out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        assert abs(rank_out["loss"] - ref["loss"]) < 1e-5
        assert rank_out["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            # rtol/atol 1e-5 in fp32: the only differences are summation orders of the
            # row-parallel all-reduce and the sharded softmax.
            torch.testing.assert_close(rank_out["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_same_seed_same_logical_weights_at_any_tp():
    """use_cpu_initialization: the master tensor is drawn whole, then split."""
    cfg = _cfg(False)
    ref = run_distributed(_run, 1, cfg, None, 0, seed=7)[0]
    out = run_distributed(_run, 2, cfg, None, 0, parallel=ParallelConfig(tensor_parallel=2), seed=7)
    for name, t in ref["state"].items():
        torch.testing.assert_close(out[0]["state"][name], t, rtol=0, atol=0, msg=name)
