"""The whole-step benchmark's smoke mode (a CI-cheap guard that benchmarks/train_step.py
still runs end to end): tiny shapes, a worker subprocess per model, the table written. No
timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_mode_runs_and_writes_its_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--smoke",
         "--out", str(tmp_path), "--set", "training.cpu_heap=keep"],
        check=True, capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    table = (tmp_path / "table.md").read_text()
    assert "train_step.py --smoke --set training.cpu_heap=keep`" in table  # the command
    for model in ("Llama (transformers)", "plait LALA"):
        assert f"| {model} |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["groups"]["smoke"]
    assert {(r["model"], r["T"]) for r in rows} == {
        (m, T) for m in ("Llama (transformers)", "plait LALA") for T in (64, 128)
    }
    for r in rows:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["flops_per_token"] > 0
        assert r["loss"] == r["loss"]  # finite enough to train: not NaN
    assert results["gemm_gflops"]["peak"] > 0


def test_interleaved_smoke_mode_prints_its_ratio_table():
    """benchmarks/interleaved_step.py: both models built in one process, steps in turn, the
    table with each model's ratio to the first. No timing is asserted."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "interleaved_step.py"), "--smoke",
         "--set", "training.cpu_heap=keep"],
        check=True, capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    ).stdout
    assert "round 2/2:" in out
    assert "--rounds 2 --set training.cpu_heap=keep`" in out  # the command, as run
    assert "| Llama (transformers) | " in out and "| 1.00x |" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| plait LALA |")]
    assert row.count("x (") == 1  # the median ratio of the rounds and its range


def test_profile_phases_prints_forward_backward_and_optimizer_step():
    """benchmarks/profile_step.py --phases at a tiny length: the engine's three phases timed
    inside the real step. No timing is asserted."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "profile_step.py"), "--phases",
         "--preset", "hybrid-tiny", "--seq-len", "64", "--steps", "2"],
        check=True, capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    ).stdout
    (line,) = [x for x in out.splitlines() if x.startswith("hybrid-tiny, 64 tokens")]
    for part in ("step ", "forward ", "backward ", "optimizer step "):
        assert part in line, line
