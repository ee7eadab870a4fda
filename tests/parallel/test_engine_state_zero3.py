"""ZeRO-3 in the logical checkpoint format (parallel/engine_state.py): what ``logical_state``
gathers at ZeRO-3 is what the same training gives at ZeRO-1, a ZeRO-3 state loaded into a
fresh ZeRO-3 engine continues bit for bit, and states move between ZeRO-1, ZeRO-3, TP=2 x
ZeRO-3 and TP=2 x DP=2 x ZeRO-3 and continue within fp32 rounding.

Every run is a tiny model on forked gloo ranks (tests/distributed.py; 2, and 4 for TP x DP)
whose batches depend only on the step index; each run is made once per session (``_run``
caches it) and shared by the tests that compare against it. ZeRO-3 runs set
``stage3_param_persistence_threshold`` to 0 unless ``persist``: DeepSpeed's default (1e5
elements) keeps every tensor of this model gathered between steps, which a real model's large
tensors are not, so both ways ZeRO-3 holds the model's parameters are covered. The DP runs use
hidden size 33 (3 heads of 11, two lightning layers: rotary attention needs an even head
size): its norms and square projections have an odd number of elements, so the last rank's
ZeRO-3 partition of them ends in padding (where DeepSpeed's own ``safe_set_full_fp32_param``
fails, and which DeepSpeed leaves uninitialised: ``clear_zero3_padding``). TP=2 needs an even
split, so the TP tests use hidden size 32 with an attention layer.
"""

from __future__ import annotations

import functools

import pytest
import torch

from plait.launcher.config import Config
from plait.models.common import ModelConfig
from plait.parallel.config import ParallelConfig
from tests.distributed import run_distributed

VOCAB, T, BATCH = 200, 24, 4
STEPS = 3  # straight runs: snapshots after 0..3 steps; resumed runs load step 2, take step 3
RESUME_AT = 2


def _cfg(optimizer: str, zero: int, tp: int, dp: int, hidden: int, bf16: bool) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(pattern="LL" if hidden % 2 else "LA", num_layers=2, hidden_size=hidden,
                            num_heads=3 if hidden % 2 else 4, ffn_hidden_size=2 * hidden,
                            lightning_block=8)
    cfg.parallel = ParallelConfig(tensor_parallel=tp, zero_stage=zero)
    o = cfg.optimizer
    # A constant LR: the schedule is the checkpoint's business (launcher/checkpoint/), the
    # optimizer's step count (bias correction) is this module's.
    o.name, o.warmup_steps = optimizer, 0
    o.lr = o.min_lr = 2e-2 if optimizer == "lamb" else 1e-3  # AdamW's steps are not scaled
    o.weight_decay = 0.1  # grad_clip stays at its default 1.0: clipping sees the global norm
    # ZeRO-3's gradients differ from ZeRO-1's in the last bits (a few ulp, measured); with eps
    # 1e-8 and lr 2e-2 AdamW's first step turned that into 1.8e-4 of a tensor's largest weight
    # where a gradient is ~1e-7 (u = g / (|g| + eps)). A larger eps keeps layouts comparable.
    o.eps = 1e-3
    cfg.training.micro_batch_size = BATCH // dp
    cfg.training.steps = 8
    cfg.training.precision = "bf16" if bf16 else "fp32"
    return cfg


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    tok = torch.randint(0, VOCAB, (BATCH, T + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def _snapshot(engine) -> dict:
    from plait.parallel.engine_state import logical_state

    tensors, steps = {}, set()
    for name, t, step in logical_state(engine):
        tensors[name] = t
        steps.add(step)
    return {"tensors": tensors, "steps": steps}


def _job(rt, cfg: Config, start: int, n: int, load: dict | None, persist: bool, warm: int):
    """Build the engine; take ``warm`` steps on other batches (state that a load must
    replace); load ``load`` (a snapshot) if given; then train steps start .. start+n-1,
    snapshotting the logical state before and after each. Returns rank 0's view."""
    import plait.launcher.engine as engine_mod
    from plait.models.common import build_model
    from plait.parallel.engine_state import clear_zero3_padding, load_logical_state
    from plait.parallel.runtime import data_parallel_mean

    if cfg.parallel.zero_stage == 3 and not persist:
        base = engine_mod.deepspeed_config  # forked rank: the patch dies with it

        def no_persistence(c, r):
            ds = base(c, r)
            ds["zero_optimization"] = {**ds["zero_optimization"],
                                       "stage3_param_persistence_threshold": 0}
            return ds

        engine_mod.deepspeed_config = no_persistence
    model = build_model(cfg.model, rt.tp, vocab_size=VOCAB)
    engine, _, _ = engine_mod.build_engine(model, cfg, rt)
    clear_zero3_padding(engine)  # DeepSpeed leaves it uninitialised (engine_state.py)
    micro = cfg.training.micro_batch_size
    rows = slice(rt.dp_rank * micro, (rt.dp_rank + 1) * micro)

    def step(index: int) -> float:
        x, y = _batch(index)
        loss = engine(x[rows], y[rows])
        engine.backward(loss)
        engine.step()
        return data_parallel_mean(loss.detach()).item()

    for i in range(warm):
        step(500 + i)
    if load is not None:
        (steps,) = load["steps"]
        load_logical_state(engine, lambda name, k: load["tensors"][name][k], steps)
    out = {"losses": [], "states": {start: _snapshot(engine)}}
    for i in range(start, start + n):
        out["losses"].append(step(i))
        out["states"][i + 1] = _snapshot(engine)
    if cfg.parallel.zero_stage == 3:
        out["partition"] = [(p.ds_numel, p.partition_numel()) for p in engine.module.parameters()]
    return out if rt.rank == 0 else None


def _run(optimizer: str, zero: int, tp: int = 1, persist: bool = False, hidden: int = 33,
         source: tuple = (), warm: int = 0, seed: int = 7, dp: int = 0,
         bf16: bool = False) -> dict:
    """A straight run (no ``source``): STEPS steps from the initial weights, on TP x DP ranks
    (DP 2 // TP unless given). A resumed run: the snapshot ``source`` = (``_run``'s keyword
    arguments of the run that made it, step) loaded, then the steps after it. Made once per
    session whichever way the arguments are spelled."""
    dp = dp or 2 // tp
    if source:
        source = (tuple(sorted(source[0].items())), source[1])  # hashable
    return _cached_run(optimizer, zero, tp, persist, hidden, source, warm, seed, dp, bf16)


@functools.cache
def _cached_run(optimizer, zero, tp, persist, hidden, source, warm, seed, dp, bf16) -> dict:
    cfg = _cfg(optimizer, zero, tp, dp, hidden, bf16)
    load, start, n = None, 0, STEPS
    if source:
        args, start = source
        load, n = _run(**dict(args))["states"][start], STEPS - start
    return run_distributed(_job, tp * dp, cfg, start, n, load, persist, warm,
                           parallel=cfg.parallel, seed=seed)[0]


def _assert_states_close(got: dict, want: dict, rtol: float, what: str) -> None:
    """Every tensor of every parameter within ``rtol`` of the reference, measured against the
    tensor's largest magnitude (exp_avg_sq is ~1e-8 where an elementwise rtol means nothing)."""
    assert got["steps"] == want["steps"], (what, got["steps"], want["steps"])
    assert got["tensors"].keys() == want["tensors"].keys(), what
    for name, tensors in want["tensors"].items():
        for k, w in tensors.items():
            g = got["tensors"][name][k]
            assert g.dtype == torch.float32 and g.shape == w.shape, (what, name, k)
            scale = w.abs().max().item()
            torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale,
                                       msg=f"{what}: {name}[{k!r}]")


def _assert_states_equal(got: dict, want: dict, what: str) -> None:
    assert got["steps"] == want["steps"], (what, got["steps"], want["steps"])
    assert got["tensors"].keys() == want["tensors"].keys(), what
    for name, tensors in want["tensors"].items():
        for k, w in tensors.items():
            assert torch.equal(got["tensors"][name][k], w), f"{what}: {name}[{k!r}]"


# ZeRO-3 computes gradients in its own way (last bits differ from ZeRO-1's, whose gradients
# equal ZeRO-0's and ZeRO-2's bit for bit here), so the layouts agree to fp32 rounding, not
# bit for bit. Measured, as a fraction of each tensor's largest magnitude over steps 0-3: worst
# 1.4e-7 (weights), 8.1e-7 (exp_avg), 1.1e-6 (exp_avg_sq), LAMB and AdamW alike; losses 1.7e-7.
# The TP layouts (other matmul shapes) measured the same: worst 9.8e-7 of a tensor's largest
# magnitude, losses 8.6e-8.
RTOL = 2e-6  # elementwise: |got - want| <= RTOL * (|want| + max |want|)
LOSS_RTOL = 1e-6
OPTIMIZERS = ["lamb", "adamw"]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero3_logical_state_equals_zero1(optimizer):
    """DP=2: after 0, 1, 2 and 3 steps the ZeRO-3 gather (weights, both moments, step count)
    equals ZeRO-1's for the same training; before the first step the moments are zero."""
    z1, z3 = _run(optimizer, 1), _run(optimizer, 3)
    for s in range(STEPS + 1):
        assert z3["states"][s]["steps"] == {s}
        _assert_states_close(z3["states"][s], z1["states"][s], RTOL, f"step {s}")
    for tensors in z3["states"][0]["tensors"].values():
        assert not tensors["exp_avg"].any() and not tensors["exp_avg_sq"].any()
    torch.testing.assert_close(z3["losses"], z1["losses"], rtol=LOSS_RTOL, atol=0)
    padded = [n for n, per_rank in z3["partition"] if 2 * per_rank != n]
    assert padded, "no tensor ends in ZeRO-3 padding: the padding path is not exercised"


@pytest.mark.parametrize("persist", [False, True], ids=["partitioned", "persistent"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_zero3_round_trip_is_bit_exact(optimizer, persist):
    """ZeRO-3 state after 2 steps -> a fresh ZeRO-3 engine (same layout, one that took a step
    on other batches first: its weights, moments and step count must all be replaced) -> step
    3's loss and the state after it equal the uninterrupted run's exactly (torch.equal: the
    same operations on the same values), and the state right after the load is the one
    loaded."""
    run = dict(optimizer=optimizer, zero=3, persist=persist)
    straight = _run(**run)
    resumed = _run(**run, warm=1, seed=99, source=(run, RESUME_AT))
    _assert_states_equal(resumed["states"][RESUME_AT], straight["states"][RESUME_AT], "loaded")
    assert resumed["losses"] == straight["losses"][RESUME_AT:]
    _assert_states_equal(resumed["states"][STEPS], straight["states"][STEPS], "continued")


def test_zero3_round_trip_bf16():
    """bf16 parameters over fp32 masters: the load refreshes the model's bf16 partitions from
    the masters (separate tensors here), so the round trip is bit-exact as in fp32."""
    run = dict(optimizer="lamb", zero=3, bf16=True)
    straight = _run(**run)
    resumed = _run(**run, warm=1, seed=99, source=(run, RESUME_AT))
    _assert_states_equal(resumed["states"][RESUME_AT], straight["states"][RESUME_AT], "loaded")
    assert resumed["losses"] == straight["losses"][RESUME_AT:]
    _assert_states_equal(resumed["states"][STEPS], straight["states"][STEPS], "continued")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("src,dst", [(1, 3), (3, 1)], ids=["zero1-to-zero3", "zero3-to-zero1"])
def test_cross_layout_continues(optimizer, src, dst):
    """A ZeRO-1 state loaded at ZeRO-3 (and back): right after the load the gathered state is
    exactly the one loaded (scattering and gathering move values, never round them); the
    next step continues the uninterrupted run of the target layout within fp32 rounding."""
    resumed = _run(optimizer, dst, source=(dict(optimizer=optimizer, zero=src), RESUME_AT))
    _assert_states_equal(resumed["states"][RESUME_AT], _run(optimizer, src)["states"][RESUME_AT],
                         "loaded")
    target = _run(optimizer, dst)
    torch.testing.assert_close(resumed["losses"], target["losses"][RESUME_AT:],
                               rtol=LOSS_RTOL, atol=0)
    _assert_states_close(resumed["states"][STEPS], target["states"][STEPS], RTOL, "continued")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_load_before_any_step(optimizer):
    """Step 0 (zero moments, no optimizer state) from ZeRO-1 into a ZeRO-3 engine that was
    initialised from another seed and took a step: after the load the state is step 0 with
    zero moments, and training from it is the straight ZeRO-3 run, bit for bit (the loaded
    weights are the same initial weights)."""
    resumed = _run(optimizer, 3, warm=1, seed=99, source=(dict(optimizer=optimizer, zero=1), 0))
    straight = _run(optimizer, 3)
    _assert_states_equal(resumed["states"][0], straight["states"][0], "loaded")
    assert resumed["losses"] == straight["losses"]
    _assert_states_equal(resumed["states"][STEPS], straight["states"][STEPS], "trained")


def test_tp2_zero3():
    """TP=2 x ZeRO-3 (DP=1, 2 ranks): the gather equals TP=2 ZeRO-1's for the same training,
    and states reshard both ways between it and DP=2 ZeRO-3 (exact right after the load,
    continuing within fp32 rounding: TP=2 and DP=2 differ in matmul shapes)."""
    tp3, tp1 = _run("lamb", 3, tp=2, hidden=32), _run("lamb", 1, tp=2, hidden=32)
    for s in range(STEPS + 1):
        _assert_states_close(tp3["states"][s], tp1["states"][s], RTOL, f"step {s}")
    for src, dst in ((2, 1), (1, 2)):
        what = f"tp{src}->tp{dst}"
        saved = dict(optimizer="lamb", zero=3, tp=src, hidden=32)
        resumed = _run("lamb", 3, tp=dst, hidden=32, source=(saved, RESUME_AT))
        loaded = _run(**saved)["states"][RESUME_AT]
        _assert_states_equal(resumed["states"][RESUME_AT], loaded, f"{what} loaded")
        target = _run("lamb", 3, tp=dst, hidden=32)
        torch.testing.assert_close(resumed["losses"], target["losses"][RESUME_AT:],
                                   rtol=LOSS_RTOL, atol=0)
        _assert_states_close(resumed["states"][STEPS], target["states"][STEPS], RTOL,
                             f"{what} continued")


def test_tp2_dp2_zero3():
    """TP=2 x DP=2 x ZeRO-3 (4 ranks): both gathers at once. The DP=2 ZeRO-3 state loads into
    it exactly and continues its straight run within fp32 rounding; its own gather equals TP=2
    DP=1 ZeRO-3's for the same training within fp32 rounding."""
    straight = _run("lamb", 3, tp=2, hidden=32, dp=2)
    single = _run("lamb", 3, tp=2, hidden=32)
    for s in range(STEPS + 1):
        _assert_states_close(straight["states"][s], single["states"][s], RTOL, f"step {s}")
    saved = dict(optimizer="lamb", zero=3, hidden=32)
    resumed = _run("lamb", 3, tp=2, hidden=32, dp=2, source=(saved, RESUME_AT))
    loaded = _run(**saved)["states"][RESUME_AT]
    _assert_states_equal(resumed["states"][RESUME_AT], loaded, "loaded")
    torch.testing.assert_close(resumed["losses"], straight["losses"][RESUME_AT:],
                               rtol=LOSS_RTOL, atol=0)
    _assert_states_close(resumed["states"][STEPS], straight["states"][STEPS], RTOL,
                         "continued")
