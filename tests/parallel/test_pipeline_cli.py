"""Pipeline stages through the CLI, as a user runs them: torchrun, PP=2 x TP=2 on the tiny
config (4 micro-batches of 2 sequences a step: the global batch of the tiny config), its
losses against the stored single-process golden losses (rel 1e-4), validation, TensorBoard,
the progress bar's bubble, checkpoint save and resume under the same layout, and the same
checkpoint resumed by a single process (the format is layout-free)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((REPO / "tests/launcher/golden_losses.json").read_text())["losses"]


def _run(out: Path, *sets: str, nproc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc_per_node={nproc}"] if nproc else [sys.executable]
    args = ["--config", "configs/tiny.yaml", "--set", f"out_dir={out}",
            "--set", "training.micro_batch_size=2", "--set", "training.grad_accum=4",
            "--set", "training.eval_every=4"]
    for s in sets:
        args += ["--set", s]
    proc = subprocess.run(launch + ["-m", "plait.launcher.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(out: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["kind"] == kind}


def test_torchrun_pp2_tp2_follows_single_process_and_resumes(tmp_path):
    pp = ("parallel.pipeline_parallel=2", "parallel.tensor_parallel=2")
    out = tmp_path / "pp"
    proc = _run(out, "training.steps=4", "checkpoint.save_every=2", *pp, nproc=4)
    assert "pp 2 x 1 chunks" in proc.stdout
    assert "bubble=20%" in proc.stderr  # (p-1)/(m+p-1) with p=2, m=4, beside tokens/s
    train = _metrics(out)
    assert [train[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx(GOLDEN[:4], rel=1e-4)
    assert all(train[s]["grad_norm"] > 0 and train[s]["tokens_per_s"] > 0 for s in train)
    val = _metrics(out, "val")[4]["loss"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lm_loss", "val/loss"} <= set(acc.Tags()["scalars"])

    # The same layout resumes from step 2 and takes the same steps 3 and 4.
    again = tmp_path / "again"
    ckpt = out / "checkpoints" / "step2"
    _run(again, "training.steps=4", f"checkpoint.resume={ckpt}", *pp, nproc=4)
    resumed = _metrics(again)
    assert sorted(resumed) == [3, 4]
    for s in (3, 4):
        assert resumed[s]["loss"] == pytest.approx(train[s]["loss"], rel=1e-6)
    assert _metrics(again, "val")[4]["loss"] == pytest.approx(val, rel=1e-6)

    # A single process resumes the pipeline's checkpoint (resharded: one logical tensor each).
    single = tmp_path / "single"
    proc = _run(single, "training.steps=4", f"checkpoint.resume={ckpt}")
    assert "resharded from" in proc.stdout
    one = _metrics(single)
    for s in (3, 4):
        assert one[s]["loss"] == pytest.approx(train[s]["loss"], rel=1e-4)
    assert _metrics(single, "val")[4]["loss"] == pytest.approx(val, rel=1e-4)
