"""Checkpoints: exact resume under each layout, resharding (weights and optimizer state as
the same logical tensors), atomicity under kill -9 at every point of a save, corrupt files,
preemption by signal, non-finite steps skipped on every rank, and the run-identity checks.

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

import pytest
import torch

from plait.launcher import checkpoint
from plait.launcher.config import Config
from plait.launcher.engine import build_engine
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
                            ffn_hidden_size=64, lightning_block=8)  # fmt: skip
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
    from plait.launcher.train import sequence_parallel_context

    sp = sequence_parallel_context(cfg)
    model = build_model(cfg.model, rt.tp, vocab_size=VOCAB, sp=sp)
    engine, _, scheduler = build_engine(model, cfg, rt)
    loader = _Loader()
    identity = checkpoint.run_identity(cfg, "tokenizer-sha")
    out: dict = {}
    if mode == "resume":
        path, problems = checkpoint.find_resumable(Path(cfg.checkpoint.dir))
        meta = checkpoint.load(path, engine, scheduler, loader, cfg, rt, identity)
        if cfg.parallel.zero_stage < 3:  # ZeRO-3 goes through DeepSpeed's own format
            out["loaded"] = {name: t for name, t, _ in logical_state(engine)}
        out["resharded"], out["problems"] = meta["resharded"], problems
        out["step"], out["consumed"] = engine.global_steps, loader.consumed_samples
        out["lr"] = scheduler.get_last_lr()[0]
    out["losses"] = _train(engine, rt, SequenceParallel() if sp is None else sp, n, loader)
    if mode == "save":
        checkpoint.save(Path(cfg.checkpoint.dir), engine.global_steps, engine, scheduler,
                        loader, cfg, rt, identity)  # fmt: skip
    if cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            out["weights"] = gather_full(engine.module)
    else:
        out["weights"] = gather_full(engine.module)
    return out if rt.rank == 0 else None


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


def test_resharding_carries_weights_and_optimizer_state(tmp_path):
    """Saved at (TP=2, DP=2, ZeRO-1), resumed at (TP=1, DP=4), (TP=4, DP=1) and (TP=1, DP=2,
    ZeRO-2): the loaded weights and LAMB moments are the saved logical tensors exactly, and the
    next two steps' losses (rel 1e-5) and weights (max abs 1e-5; measured ~1e-7, summation
    order) equal the uninterrupted run's."""
    src = _cfg(tp=2, dp=2, zero=1, ckpt=str(tmp_path))
    straight = _run(src, "train", 5, 4)
    _run(src, "save", 3, 4)
    saved, _ = checkpoint.find_resumable(tmp_path)
    meta = json.loads((saved / "meta.json").read_text())
    reader = checkpoint._Reader(saved, meta)
    for tp, dp, zero in ((1, 4, 1), (4, 1, 1), (1, 2, 2)):
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
                                "sha256": checkpoint._sha256(saved / shard)}  # fmt: skip
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
               f"--nproc_per_node={nproc}", "-m", "plait.launcher.train"]  # fmt: skip
    base = ["out_dir=" + str(out), "logging.progress_bar=false", "training.eval_every=0",
            "model.num_layers=2", "model.pattern=LA", "optimizer.warmup_steps=2",
            "optimizer.decay_steps=40"]  # fmt: skip
    args = ["--config", "configs/tiny.yaml"] + [a for s in base + list(sets) for a in ("--set", s)]
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd + args, cwd=REPO, env=e, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
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
                          ("rename", "step6")):  # fmt: skip
        run = tmp_path / point
        shutil.copytree(base, run)
        proc = _cli(run, "training.steps=6", env={"PLAIT_TEST_KILL_IN_SAVE": point},
                    check=False)  # fmt: skip
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
           "-m", "plait.launcher.train", "--config", "configs/tiny.yaml"]  # fmt: skip
    base = ["out_dir=" + str(out), "logging.progress_bar=false", "training.eval_every=0",
            "model.num_layers=2", "model.pattern=LA", "optimizer.warmup_steps=2",
            "optimizer.decay_steps=40", "training.steps=40", *sets]  # fmt: skip
    args = [a for s in base for a in ("--set", s)]
    proc = subprocess.Popen(cmd + args, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
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
                check=False)  # fmt: skip
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
            "training.micro_batch_size=4"]  # fmt: skip
    out = tmp_path / "once"
    _cli(out, *sets, "training.steps=6", nproc=2, env={"PLAIT_TEST_NAN_AT": "3:1"})
    rows = _losses(out)
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (4, 5, 6))  # finite again
    out = tmp_path / "thrice"
    proc = _cli(out, *sets, "training.steps=10", nproc=2, env={"PLAIT_TEST_NAN_AT": "3,4,5:1"},
                check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "3 steps in a row had a non-finite gradient norm" in proc.stderr
    stop = json.loads((out / "stop.json").read_text())
    assert stop == {"reason": "non-finite", "step": 5, "exit_code": 3}
    assert (out / "checkpoints" / "step5" / "COMPLETE").is_file()
