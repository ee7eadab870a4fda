"""Activation checkpointing (``training.recompute``): the loss and every gradient equal the
run without it, in one process and under TP x CP (the loss in several chunks, the last one
shorter), and each mode re-runs what it says (a recompute that silently did nothing would
pass the equality tests)."""

import pytest
import torch
import torch.distributed as dist

from plait.launcher.config import ConfigError, load_config
from plait.models.common import build_model, lm
from plait.parallel.config import ParallelConfig
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import gather_full, load_full_state
from tests.distributed import run_distributed
from tests.models.test_sequence_parallel_model import VOCAB, T, _batch, _cfg

PATTERN = "LAWMSBCHGQDR"  # every registered letter: linear, softmax-like, conv, SSM, delta rule


def _loss_and_grads(model, recompute: str):
    model.recompute = recompute
    model.zero_grad(set_to_none=True)
    x, y, docs, pos = _batch()
    loss = model(x, y, positions_BT=pos, doc_ids_BT=docs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _equal_run(rt, mode, seed):
    lm.LOSS_CHUNK = 20  # the loss in chunks of 20, 20 and 8 tokens
    torch.manual_seed(seed)
    model = build_model(_cfg(PATTERN), 1, vocab_size=VOCAB)
    model.train()
    return _loss_and_grads(model, "none"), _loss_and_grads(model, mode)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_equals_none(mode, seed):
    """One process, packed documents, every letter (MoH's balance loss included): float32
    runs of the same ops, so only summation-order noise may differ."""
    (loss0, g0), (loss1, g1) = run_distributed(_equal_run, 1, mode, seed)[0]
    assert abs(loss1.item() - loss0.item()) < 1e-6
    for name, g in g0.items():
        assert g.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def _counts_run(rt, mode):
    model = build_model(_cfg("LAW"), 1, vocab_size=VOCAB)
    counts: dict[str, int] = {}

    def hook(name):
        def fn(*_):
            counts[name] = counts.get(name, 0) + 1

        return fn

    for i, block in enumerate(model.blocks):
        block.mixer.register_forward_pre_hook(hook(f"{block.letter}{i}.mixer"))
        block.mlp.register_forward_pre_hook(hook(f"{block.letter}{i}.mlp"))
    model.recompute = mode
    x, y, docs, pos = _batch()
    model(x, y, positions_BT=pos, doc_ids_BT=docs).backward()
    trained = dict(counts)
    counts.clear()
    with torch.no_grad():
        model(x, y, positions_BT=pos, doc_ids_BT=docs)
    return trained, dict(counts)


@pytest.mark.parametrize(
    "mode,rerun",
    [
        ("none", set()),
        ("full", {"L0.mixer", "A1.mixer", "W2.mixer", "L0.mlp", "A1.mlp", "W2.mlp"}),
        ("selective", {"A1.mixer", "W2.mixer", "L0.mlp", "A1.mlp", "W2.mlp"}),
    ],
)
def test_recompute_reruns_what_it_says(mode, rerun):
    """Forward pre-hooks count the calls of each mixer and MLP (the re-run stops early,
    after the last saved tensor, so post-hooks may not fire) over one forward and backward:
    twice for what the mode recomputes, once for what it keeps. No recompute without grad."""
    trained, no_grad = run_distributed(_counts_run, 1, mode)[0]
    assert {name for name, n in trained.items() if n == 2} == rerun
    assert set(trained.values()) <= {1, 2} and len(trained) == 6
    assert set(no_grad.values()) == {1}


def _bad_value_run(rt):
    model = build_model(_cfg("L"), 1, vocab_size=VOCAB)
    model.recompute = "some"
    x, y, docs, pos = _batch()
    try:
        model(x, y, positions_BT=pos, doc_ids_BT=docs)
    except ValueError as e:
        return str(e)
    return ""


def test_recompute_config_and_bad_value():
    assert load_config(None, ["training.recompute=selective"]).training.recompute == "selective"
    with pytest.raises(ConfigError, match="training.recompute: 'some' is not one of"):
        load_config(None, ["training.recompute=some"])
    assert run_distributed(_bad_value_run, 1)[0].startswith("recompute: 'some' not in")


def _run(rt, full_state, pattern, softmax, zigzag, modes):
    """Loss and gathered gradients (mean over the CP ranks) for each recompute mode."""
    from megatron.core import parallel_state as ps

    lm.LOSS_CHUNK = 5  # 24 or 12 tokens per rank: several chunks, the last shorter
    sp = SequenceParallel.from_parallel_state(softmax, zigzag)
    model = build_model(_cfg(pattern), rt.tp, vocab_size=VOCAB, sp=sp)
    load_full_state(model, full_state)
    x, y, docs, pos = _batch()
    sl = sp.local_index(T)
    out = {}
    for mode in modes:
        model.recompute = mode
        model.zero_grad(set_to_none=True)
        loss = model(x[:, sl], y[:, sl], positions_BT=pos[:, sl], doc_ids_BT=docs[:, sl])
        loss.backward()
        grads = gather_full(model, grads=True)
        loss = loss.detach().clone()
        cp = ps.get_context_parallel_group()
        for t in [loss, *grads.values()]:
            dist.all_reduce(t, group=cp)
            t /= sp.world
        out[mode] = {"loss": loss.item(), "grads": grads}
    return out


def _state_run(rt, pattern):
    return gather_full(build_model(_cfg(pattern), 1, vocab_size=VOCAB))


@pytest.mark.parametrize(
    "tp,cp,pattern,softmax,zigzag",
    [(2, 2, "LWMC", "lasp2h", False), (1, 2, "SHAB", "ring", False), (2, 2, "AA", "ring", True),
     (2, 2, "GQ", "ring", False), (2, 2, "DR", "lasp2h", False)],
)
def test_recompute_under_tp_and_cp(tp, cp, pattern, softmax, zigzag):
    """TP all-reduces, LASP-2's all-gathers, halos and ring passes run again in the
    backward's re-run, in the same order on every rank: the gradients equal "none"'s."""
    state = run_distributed(_state_run, 1, pattern, seed=3)[0]
    outs = run_distributed(
        _run, tp * cp, state, pattern, softmax, zigzag, ("none", "full", "selective"),
        parallel=ParallelConfig(tensor_parallel=tp, context_parallel=cp), seed=3,
    )
    for out in outs:
        ref = out["none"]
        for mode in ("full", "selective"):
            assert abs(out[mode]["loss"] - ref["loss"]) < 1e-6
            for name, g in ref["grads"].items():
                assert g.abs().sum() > 0, f"{name} got no gradient"
                torch.testing.assert_close(
                    out[mode]["grads"][name], g, rtol=1e-5, atol=1e-7, msg=f"{mode} {name}"
                )
