"""Checkpoints: exact resume under each layout, resharding (weights and optimizer state as
the same logical tensors), atomicity under kill -9 at every point of a save (of either rank of
a torchrun job too), asynchronous saves, corrupt files, preemption by signal, non-finite steps
and loss spikes skipped on every rank, and the run-identity checks.

The in-process tests drive DeepSpeed engines on forked gloo ranks (tests/distributed.py)
with batches that depend only on the global step; the CLI tests run the real job.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from plait.launcher import checkpoint
from plait.launcher.config import Config
from plait.launcher.engine import build_engine
from plait.launcher.loop import SpikeDetector
from plait.models.common import ModelConfig, build_model
from plait.parallel.config import ParallelConfig
from plait.parallel.engine_state import logical_state
from plait.parallel.runtime import data_parallel_mean
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import gather_full
from tests.distributed import run_distributed

VOCAB, T, BATCH = 200, 24, 4
# _cfg's schedule after 3 steps: 2 of warmup, then cosine over 6 from 2e-2 to 2e-3
LR_AT_3 = 2e-3 + (2e-2 - 2e-3) * 0.5 * (1 + math.cos(math.pi / 6))
REPO = Path(__file__).resolve().parents[2]


def _cfg(tp=1, dp=1, zero=1, cp=1, optimizer="lamb", ckpt="") -> Config:
    cfg = Config()
    cfg.model = ModelConfig(pattern="LA", num_layers=2, hidden_size=32, num_heads=4,
                            ffn_hidden_size=64, lightning_block=8)
    cfg.parallel = ParallelConfig(tensor_parallel=tp, context_parallel=cp, zero_stage=zero)
    o = cfg.optimizer
    o.name, o.lr, o.min_lr, o.warmup_steps, o.decay_steps = optimizer, 2e-2, 2e-3, 2, 8
    o.weight_decay = 0.1
    cfg.training.micro_batch_size = BATCH // dp
    cfg.training.steps = 8
    cfg.training.precision = "fp32"
    cfg.data.seq_len = T
    cfg.checkpoint.dir = ckpt
    return cfg


class _Loader:
    """The loader's checkpoint interface (its own resume is tested in tests/data)."""

    def __init__(self):
        self.consumed_samples = 0

    def state_dict(self):
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, s):
        self.consumed_samples = s["consumed_samples"]


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    tok = torch.randint(0, VOCAB, (BATCH, T + 1), generator=g)
    return tok[:, :-1], tok[:, 1:]


def _train(engine, rt, sp, n: int, loader) -> list[float]:
    micro, losses = BATCH // rt.dp, []
    index = sp.local_index(T)
    for _ in range(n):
        x, y = _batch(engine.global_steps)
        rows = slice(rt.dp_rank * micro, (rt.dp_rank + 1) * micro)
        loss = engine(x[rows][:, index], y[rows][:, index])
        engine.backward(loss)
        engine.step()
        loader.consumed_samples += BATCH
        losses.append(data_parallel_mean(loss.detach()).item())
    return losses


def _job(rt, cfg: Config, mode: str, n: int):
    """mode: "train" n steps; "save" after n steps; "resume" from the checkpoint, then n."""
    from plait.launcher.layout import sequence_parallel_context

    sp = sequence_parallel_context(cfg)
    model = build_model(cfg.model, rt.tp, vocab_size=VOCAB, sp=sp)
    engine, _, scheduler = build_engine(model, cfg, rt)
    loader = _Loader()
    identity = checkpoint.run_identity(cfg, "tokenizer-sha")
    out: dict = {}
    if mode == "resume":
        path, problems = checkpoint.find_resumable(Path(cfg.checkpoint.dir))
        meta = checkpoint.load(path, engine, scheduler, loader, cfg, rt, identity)
        out["loaded"] = {name: t for name, t, _ in logical_state(engine)}
        out["resharded"], out["problems"] = meta["resharded"], problems
        out["step"], out["consumed"] = engine.global_steps, loader.consumed_samples
        out["lr"] = scheduler.get_last_lr()[0]
    sp = SequenceParallel() if sp is None else sp
    out["losses"] = _train(engine, rt, sp, n, loader)
    if mode == "save":
        checkpoint.save(Path(cfg.checkpoint.dir), engine.global_steps, engine, scheduler,
                        loader, cfg, rt, identity)
    if mode == "save_async":
        out.update(_save_async_and_train_on(engine, scheduler, loader, cfg, rt, identity, sp))
    if cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            out["weights"] = gather_full(engine.module)
    else:
        out["weights"] = gather_full(engine.module)
    return out if rt.rank == 0 else None


def _save_async_and_train_on(engine, scheduler, loader, cfg, rt, identity, sp) -> dict:
    """Start an asynchronous save, hold rank 0's writer (PLAIT_TEST_HOLD_SAVE), train two
    more steps while it is held, then let it write and wait."""
    from plait.parallel.runtime import barrier

    ckpt = Path(cfg.checkpoint.dir)
    gate = ckpt.parent / "gate"
    os.environ["PLAIT_TEST_HOLD_SAVE"] = str(gate)
    saver = checkpoint.Saver(ckpt, cfg, rt, identity, asynchronous=True)
    tag = saver.save(engine.global_steps, engine, scheduler, loader).name
    after = _train(engine, rt, sp, 2, loader)  # changes weights and moments in place
    out = {"in_flight": (ckpt / f".tmp-{tag}").is_dir() and not (ckpt / tag).exists()}
    barrier()  # every rank trained on while the save was held
    if rt.rank == 0:
        gate.touch()
    saver.wait()
    out["complete"], out["after"] = checkpoint.verify(ckpt / tag), after
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - v).abs().max().item() for k, v in b.items())


def _run(cfg: Config, mode: str, n: int, world: int):
    return run_distributed(_job, world, cfg, mode, n, parallel=cfg.parallel, seed=7)[0]


@pytest.mark.parametrize(
    "layout",
    [
        dict(dp=2, zero=1, optimizer="adamw"),
        dict(dp=2, zero=2, optimizer="lamb"),
        dict(tp=2, zero=1),
        dict(tp=2, zero=0),
        dict(cp=2, zero=1),
        dict(dp=2, zero=3, optimizer="adamw"),
    ],
    ids=["dp2-zero1-adamw", "dp2-zero2-lamb", "tp2", "tp2-zero0", "cp2", "dp2-zero3"],
)
def test_resume_is_bit_exact(tmp_path, layout):
    """20 steps straight vs 10 + save + resume + 10: per-step losses and final weights equal
    with zero tolerance (same machine, same layout; the cosine schedule runs across the
    break)."""
    world = layout.get("tp", 1) * layout.get("dp", 1) * layout.get("cp", 1)
    cfg = _cfg(ckpt=str(tmp_path), **layout)
    cfg.optimizer.decay_steps = 20
    straight = _run(cfg, "train", 20, world)
    first = _run(cfg, "save", 10, world)
    second = _run(cfg, "resume", 10, world)
    assert second["step"] == 10 and second["consumed"] == 10 * BATCH and not second["resharded"]
    assert first["losses"] + second["losses"] == straight["losses"]
    for name, w in straight["weights"].items():
        assert torch.equal(second["weights"][name], w), name


def test_async_save_is_bit_exact_while_training_goes_on(tmp_path):
    """An asynchronous save at step 10 (TP=2, ZeRO-0) whose writer is held while both ranks
    train two more steps (the checkpoint is still a .tmp directory then: training does not
    wait for the writer), then released: resuming from it gives 20 steps bit-identical to the
    straight run. At ZeRO-0 the gathered weights are the live parameters, so this shows that
    the writer's copies are not the tensors training goes on changing (without the copy it
    fails). DP=2 ZeRO-1 with asynchronous saves resumes bit for bit in the torchrun kill test
    below."""
    world = 2
    cfg = _cfg(ckpt=str(tmp_path / "ckpt"), tp=2, zero=0)
    cfg.optimizer.decay_steps = 20
    straight = _run(cfg, "train", 20, world)
    first = _run(cfg, "save_async", 10, world)
    assert first["in_flight"] and first["complete"] == ""
    assert first["after"] == straight["losses"][10:12]  # it trained on meanwhile
    second = _run(cfg, "resume", 10, world)
    assert second["step"] == 10 and second["consumed"] == 10 * BATCH
    assert first["losses"] + second["losses"] == straight["losses"]
    for name, w in straight["weights"].items():
        assert torch.equal(second["weights"][name], w), name


def _failing_async_save(rt, cfg: Config):
    """Rank 0's writer fails (as on a full disk); every rank must learn it at wait()."""
    model = build_model(cfg.model, rt.tp, vocab_size=VOCAB)
    engine, _, scheduler = build_engine(model, cfg, rt)

    def disk_full(self):
        raise OSError(28, "No space left on device")

    if rt.rank == 0:
        checkpoint._Finish.run = disk_full
    saver = checkpoint.Saver(Path(cfg.checkpoint.dir), cfg, rt,
                             checkpoint.run_identity(cfg, "t"), asynchronous=True)
    saver.save(1, engine, scheduler, _Loader())
    while rt.rank == 0 and not saver.failed():  # polled at each step boundary in a run
        time.sleep(0.01)
    try:
        saver.wait()
    except checkpoint.CheckpointError as e:
        return str(e)
    return "no error"


def test_async_save_error_is_raised_on_every_rank(tmp_path):
    cfg = _cfg(dp=2, ckpt=str(tmp_path))
    errors = run_distributed(_failing_async_save, 2, cfg, parallel=cfg.parallel)
    for e in errors:
        assert "asynchronous save of step1 failed on rank 0" in e and "No space left" in e, e
    assert not (tmp_path / "step1").exists()


def test_spike_detector():
    d = SpikeDetector(zscore=3.0, window=4)
    for x in (2.0, 2.2, 1.8, 2.0):
        assert not d.is_spike(100.0)  # the test starts once the window is full
        d.accept(x)
    # mean 2.0, population std sqrt(0.02) = 0.1414: the threshold is 2.424
    assert not d.is_spike(2.42) and d.is_spike(2.43)
    assert not d.is_spike(float("nan"))  # a non-finite loss is the non-finite skip's
    d.accept(float("inf"))  # never enters the window
    d.skipped = 1
    again = SpikeDetector(zscore=3.0, window=4)
    again.load_state_dict(json.loads(json.dumps(d.state_dict())))
    assert list(again.losses) == [2.0, 2.2, 1.8, 2.0] and again.skipped == 1
    assert not SpikeDetector(zscore=0.0, window=2).active


class _Tokens:
    """A data source for the real loader: sample i is a fixed random sequence."""

    def sample(self, i: int) -> dict:
        rng = np.random.default_rng(i)
        return {"tokens": rng.integers(0, VOCAB, T + 1), "doc_ids": np.zeros(T, np.int64),
                "positions": np.arange(T)}


def _loop_job(rt, cfg: Config, env: dict):
    """The real training loop (launcher/loop.py) for cfg.training.steps steps."""
    from plait.data.loader import SequenceLoader
    from plait.launcher.loop import Loop

    os.environ.update(env)
    model = build_model(cfg.model, rt.tp, vocab_size=VOCAB)
    engine, _, scheduler = build_engine(model, cfg, rt)
    loader = SequenceLoader(_Tokens(), cfg.training.micro_batch_size, rt.dp, rt.dp_rank)
    spikes = SpikeDetector(cfg.training.spike_zscore, cfg.training.spike_window)
    history = Loop(cfg, rt, engine, scheduler, loader, spikes=spikes).run()
    rows = [(s.loss, s.lr, s.skipped_steps, s.spike_skipped_steps) for s in history]
    return {"rows": rows, "weights": gather_full(engine.module)}


def test_loss_spike_is_skipped_on_every_rank(tmp_path):
    """A 10x loss on rank 1 at step 4 (DP=2, ZeRO-1, z-score 6 over a window of 2): the step
    is skipped on both ranks, counted as a spike (not as non-finite) in metrics.jsonl and
    TensorBoard, the LR schedule holds, and the run continues exactly as when that step is
    skipped for a NaN: same later losses and final weights, bit for bit."""
    cfg = _cfg(dp=2, zero=1)
    cfg.training.steps, cfg.training.spike_zscore, cfg.training.spike_window = 6, 6.0, 2
    cfg.logging.progress_bar = False
    runs = {}
    for kind, env in (("spike", {"PLAIT_TEST_SPIKE_AT": "4:1"}),
                      ("nan", {"PLAIT_TEST_NAN_AT": "4:1"})):
        cfg.out_dir = str(tmp_path / kind)
        runs[kind] = run_distributed(_loop_job, 2, cfg, env, parallel=cfg.parallel)[0]
    spike, nan = runs["spike"]["rows"], runs["nan"]["rows"]
    assert [r[3] for r in spike] == [0, 0, 0, 1, 1, 1] and [r[2] for r in spike] == [0] * 6
    assert [r[2] for r in nan] == [0, 0, 0, 1, 1, 1] and [r[3] for r in nan] == [0] * 6
    assert spike[3][0] > 5 * spike[2][0] and spike[4][1] == spike[3][1]  # the LR held
    assert [r[:2] for r in spike[4:]] == [r[:2] for r in nan[4:]]  # loss and LR
    for name, w in runs["nan"]["weights"].items():
        assert torch.equal(runs["spike"]["weights"][name], w), name
    logged = _losses(tmp_path / "spike")
    assert [logged[s]["spike_skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    (events,) = (tmp_path / "spike" / "tensorboard").glob("events.*")
    assert b"train/spike_skipped_steps" in events.read_bytes()


def test_resharding_carries_weights_and_optimizer_state(tmp_path):
    """Saved at (TP=2, DP=2, ZeRO-1), resumed at (TP=1, DP=4), (TP=4, DP=1), (TP=1, DP=2,
    ZeRO-2) and (TP=1, DP=2, ZeRO-3): the loaded weights and LAMB moments are the saved
    logical tensors exactly, and the next two steps' losses (rel 1e-5) and weights (max abs
    1e-5; measured ~1e-7, summation order) equal the uninterrupted run's."""
    src = _cfg(tp=2, dp=2, zero=1, ckpt=str(tmp_path))
    straight = _run(src, "train", 5, 4)
    _run(src, "save", 3, 4)
    saved, _ = checkpoint.find_resumable(tmp_path)
    meta = json.loads((saved / "meta.json").read_text())
    reader = checkpoint._Reader(saved, meta)
    for tp, dp, zero in ((1, 4, 1), (4, 1, 1), (1, 2, 2), (1, 2, 3)):
        out = _run(_cfg(tp=tp, dp=dp, zero=zero, ckpt=str(tmp_path)), "resume", 2, tp * dp)
        assert out["resharded"] and out["step"] == 3
        for name, parts in out["loaded"].items():
            for k, t in parts.items():
                key = name if not k else f"{name}::{k}"
                assert torch.equal(t, reader.get(key)), (tp, dp, zero, key)
        assert out["lr"] == pytest.approx(LR_AT_3, rel=1e-12)  # the schedule came along
        for a, b in zip(out["losses"], straight["losses"][3:], strict=True):
            assert a == pytest.approx(b, rel=1e-5), (tp, dp, zero)
        assert _max_diff(out["weights"], straight["weights"]) < 1e-5, (tp, dp, zero)


def _job_per_tensor_groups(rt, cfg: Config, mode: str, n: int):
    """``_job`` with one parameter group per tensor, as every checkpoint before 2026-12-03
    was written (and as ZeRO-3 still runs)."""
    import plait.launcher.engine as eng

    real = eng.param_groups
    eng.param_groups = lambda *a, **k: real(*a, **{**k, "per_tensor": True})
    try:
        return _job(rt, cfg, mode, n)
    finally:
        eng.param_groups = real


def test_resume_across_parameter_grouping(tmp_path):
    """Saved with one parameter group per tensor (DP=2, ZeRO-1), resumed with one per set of
    hyperparameters: the schedule's per-group rates are rebuilt (the saved ones do not line
    up with the groups), and the next steps equal the uninterrupted run's."""
    cfg = _cfg(dp=2, zero=1, ckpt=str(tmp_path))
    straight = _run(cfg, "train", 5, 2)
    run_distributed(_job_per_tensor_groups, 2, cfg, "save", 3, parallel=cfg.parallel, seed=7)
    saved, _ = checkpoint.find_resumable(tmp_path)
    assert len(json.loads((saved / "meta.json").read_text())["scheduler"]["base_lrs"]) > 2
    out = _run(cfg, "resume", 2, 2)
    assert out["step"] == 3 and out["lr"] == pytest.approx(LR_AT_3, rel=1e-12)
    for a, b in zip(out["losses"], straight["losses"][3:], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert _max_diff(out["weights"], straight["weights"]) < 1e-5


def test_resharding_without_optimizer_state_would_differ(tmp_path):
    """Negative control for the test above: zero the saved moments and the next steps move
    elsewhere, so equal losses there mean the state really was carried."""
    src = _cfg(tp=2, dp=2, zero=1, ckpt=str(tmp_path))
    straight = _run(src, "train", 5, 4)
    _run(src, "save", 3, 4)
    saved, _ = checkpoint.find_resumable(tmp_path)
    from safetensors.torch import load_file, save_file

    meta = json.loads((saved / "meta.json").read_text())
    for shard in {v for v in meta["index"].values()}:
        t = load_file(str(saved / shard))
        save_file({k: (v.zero_() if "::" in k else v) for k, v in t.items()}, str(saved / shard))
        meta["files"][shard] = {"bytes": (saved / shard).stat().st_size,
                                "sha256": checkpoint._sha256(saved / shard)}
    (saved / "meta.json").write_text(json.dumps(meta))
    (saved / "COMPLETE").write_text(checkpoint._sha256(saved / "meta.json"))
    out = _run(_cfg(tp=1, dp=4, zero=1, ckpt=str(tmp_path)), "resume", 2, 4)
    assert _max_diff(out["weights"], straight["weights"]) > 1e-3  # vs < 1e-5 carried


def test_run_identity_mismatch_is_a_clear_error(tmp_path):
    cfg = _cfg(ckpt=str(tmp_path))
    _run(cfg, "save", 1, 1)
    other = _cfg(ckpt=str(tmp_path))
    other.model.hidden_size = 64
    with pytest.raises(RuntimeError, match=r"model.hidden_size: 32 -> 64"):
        _run(other, "resume", 1, 1)
    newdata = _cfg(ckpt=str(tmp_path))
    newdata.data.seed = 99
    with pytest.raises(RuntimeError, match=r"data.seed: 1234 -> 99.*allow_changes"):
        _run(newdata, "resume", 1, 1)
    newdata.checkpoint.allow_changes = ["data"]
    assert _run(newdata, "resume", 1, 1)["step"] == 1


def test_keep_last_and_keep_every(tmp_path):
    """keep_last=2 keeps steps 6 and 7; keep_every=3 keeps 3 and 6 forever."""
    for s in range(1, 8):
        (tmp_path / f"step{s}").mkdir()
    deleted = checkpoint.prune(tmp_path, keep_last=2, keep_every=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step3", "step6", "step7"]
    assert sorted(deleted) == ["step1", "step2", "step4", "step5"]


# ----------------------------------------------------------------------------- the CLI


def _cli(out: Path, *sets: str, env=None, nproc=0, check=True):
    cmd = [sys.executable, "-m", "plait.launcher.train"]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "plait.launcher.train"]
    base = ["out_dir=" + str(out), "logging.progress_bar=false", "training.eval_every=0",
            "model.num_layers=2", "model.pattern=LA", "optimizer.warmup_steps=2",
            "optimizer.decay_steps=40"]
    args = ["--config", "configs/tiny.yaml"] + [a for s in base + list(sets) for a in ("--set", s)]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd + args, cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == "train"}


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path):
    """kill -9 at each point of a save: the interrupted one is reported and never used, the
    newest complete one loads, and the resumed run reproduces the uninterrupted losses."""
    full = tmp_path / "full"
    _cli(full, "training.steps=6")
    base = tmp_path / "base"
    _cli(base, "training.steps=4", "checkpoint.save_every=2")
    import shutil

    for point, expect in (("shards", "step4"), ("meta", "step4"), ("complete", "step4"),
                          ("rename", "step6")):
        run = tmp_path / point
        shutil.copytree(base, run)
        proc = _cli(run, "training.steps=6", env={"PLAIT_TEST_KILL_IN_SAVE": point},
                    check=False)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        found, problems = checkpoint.find_resumable(run / "checkpoints")
        assert found.name == expect, (point, found, problems)
        if expect == "step4":
            assert any(".tmp-step6" in p for p in problems), problems
    run = tmp_path / "shards"
    proc = _cli(run, "training.steps=6")
    assert "interrupted save" in proc.stdout and "resumed from" in proc.stdout
    got, ref = _losses(run), _losses(full)
    for s in (5, 6):
        assert got[s]["loss"] == ref[s]["loss"], s


def test_kill_9_of_either_rank_during_async_saves_of_a_torchrun_job(tmp_path):
    """A two-rank torchrun job (DP=2, ZeRO-1, asynchronous saves) that restarts its workers
    after a failure, as an elastic job does, loses a rank to SIGKILL in the save of step 3 on
    each attempt, at another point each time: rank 1 in the middle of the gathers, rank 1
    after its RNG file, rank 0's writer thread after meta.json, and after the rename. Each
    restarted attempt reports the interrupted save, resumes from step 2 (never from the
    partial one) and computes step 3 again bit for bit; the kill after the rename leaves step
    3 complete, and it is the one found although ``latest`` still names step 2. (COMPLETE is
    covered by the single-process test above; each attempt here costs ~10 s of imports.)"""
    out = tmp_path / "run"
    points = ["shards:1", "rng:1", "meta:0", "rename:0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={len(points) - 1}", "-m", "plait.launcher.train",
           "--config", "configs/tiny.yaml"]
    sets = ["out_dir=" + str(out), "logging.progress_bar=false", "training.eval_every=0",
            "model.num_layers=2", "model.pattern=LA", "parallel.zero_stage=1",
            "training.micro_batch_size=4", "training.steps=3", "checkpoint.save_every=2",
            "checkpoint.async_save=true"]
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun's shared store keeps the previous
    # attempt's keys, and a restarted gloo group may connect to a dead rank (pytorch#135712).
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PLAIT_TEST_KILL_IN_SAVE=";".join(f"{p}@3" for p in points))
    proc = subprocess.run(cmd + [a for x in sets for a in ("--set", x)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0  # the last attempt was killed too
    assert log.count("(exitcode: -9)") == len(points), log[-4000:]  # one SIGKILL an attempt
    ckpts = out / "checkpoints"
    assert log.count(f"{ckpts / '.tmp-step3'}: an interrupted save") == len(points) - 1
    assert log.count(f"resumed from {ckpts / 'step2'} at step 2") == len(points) - 1
    found, problems = checkpoint.find_resumable(ckpts)
    assert found == ckpts / "step3" and not problems
    assert (ckpts / "latest").read_text().strip() == "step2"  # killed before it moved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step3 = [r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 3]
    assert len(step3) == len(points) and len(set(step3)) == 1, step3


def test_corrupt_checkpoint_falls_back_to_the_previous(tmp_path):
    out = tmp_path / "run"
    _cli(out, "training.steps=4", "checkpoint.save_every=2")
    shard = out / "checkpoints" / "step4" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    found, problems = checkpoint.find_resumable(out / "checkpoints")
    assert found.name == "step2"
    assert any("step4" in p and "sha256" in p for p in problems), problems


def _wait_for_step(out: Path, step: int, proc, timeout=300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-2000:] + proc.stderr.read()[-3000:])
        f = out / "metrics.jsonl"
        if f.exists() and any(json.loads(x)["step"] >= step for x in f.read_text().splitlines()):
            return
        time.sleep(0.2)
    raise AssertionError("the run did not reach step {step}")


def test_sigusr1_saves_agrees_and_exits_for_requeue(tmp_path):
    """SIGUSR1 to one rank of a torchrun job: every rank stops at the same step boundary,
    a checkpoint is saved, stop.json says why, and the resumed run reproduces the
    uninterrupted losses exactly."""
    out = tmp_path / "pre"
    sets = ["parallel.zero_stage=1", "training.micro_batch_size=4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "plait.launcher.train", "--config", "configs/tiny.yaml"]
    base = ["out_dir=" + str(out), "logging.progress_bar=false", "training.eval_every=0",
            "model.num_layers=2", "model.pattern=LA", "optimizer.warmup_steps=2",
            "optimizer.decay_steps=40", "training.steps=40", *sets]
    args = [a for s in base for a in ("--set", s)]
    proc = subprocess.Popen(cmd + args, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 3, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    pids = sorted(int(p) for p in workers.stdout.split())
    assert len(pids) == 2, workers.stdout
    os.kill(pids[1], signal.SIGUSR1)  # one rank only: the others learn it by all-reduce
    proc.wait(timeout=300)
    assert proc.returncode != 0  # torchrun reports a worker's non-zero exit as its own 1
    stop = json.loads((out / "stop.json").read_text())
    assert stop["reason"] == "preempted" and stop["exit_code"] == 75
    k = stop["step"]
    assert (out / "checkpoints" / f"step{k}" / "COMPLETE").is_file() and k < 40
    _cli(out, *sets, f"training.steps={k + 3}", nproc=2)
    _cli(tmp_path / "full", *sets, f"training.steps={k + 3}", nproc=2)
    got, ref = _losses(out), _losses(tmp_path / "full")
    for s in range(1, k + 4):
        assert got[s]["loss"] == ref[s]["loss"], s


def test_time_limit_saves_and_exits_75(tmp_path):
    out = tmp_path / "tl"
    proc = _cli(out, "training.steps=1000", "training.time_limit=1", "training.exit_margin=0",
                check=False)
    assert proc.returncode == 75, proc.stderr[-2000:]
    stop = json.loads((out / "stop.json").read_text())
    assert stop["reason"] == "time limit"
    assert (out / "checkpoints" / f"step{stop['step']}" / "COMPLETE").is_file()


@pytest.mark.parametrize("zero,tp", [(0, 2), (1, 1)])
def test_nonfinite_steps_are_skipped_on_every_rank(tmp_path, zero, tp):
    """A NaN in rank 1's gradients at step 3: the step is skipped on both ranks (the weights
    stay finite, the count is logged) and the run goes on; three in a row stop it (exit 3)
    with a checkpoint. ZeRO-0 with TP=2 (plait's guard: ranks hold different shards) and
    ZeRO-1 with DP=2 (DeepSpeed's overflow check)."""
    sets = [f"parallel.zero_stage={zero}", f"parallel.tensor_parallel={tp}",
            "training.micro_batch_size=4"]
    out = tmp_path / "once"
    _cli(out, *sets, "training.steps=6", nproc=2, env={"PLAIT_TEST_NAN_AT": "3:1"})
    rows = _losses(out)
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (4, 5, 6))  # finite again
    out = tmp_path / "thrice"
    proc = _cli(out, *sets, "training.steps=10", nproc=2, env={"PLAIT_TEST_NAN_AT": "3,4,5:1"},
                check=False)
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite gradient norm" in proc.stderr
    stop = json.loads((out / "stop.json").read_text())
    assert stop == {"reason": "non-finite", "step": 5, "exit_code": 3}
    assert (out / "checkpoints" / "step5" / "COMPLETE").is_file()
