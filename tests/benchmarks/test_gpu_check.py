"""benchmarks/gpu_check.py's smoke mode: the one script a GPU machine's few minutes go to must
not rot while no GPU is lent. On CPU (TRITON_INTERPRET=1, tiny shapes) it runs every section:
each Triton kernel against its reference (a real numerical check), the launcher for 3 steps
on gloo, one family step with its MFU arithmetic, the attention comparison; what needs CUDA
is skipped with its reason. No timing is asserted."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_smoke_mode_runs_every_section_and_writes_its_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    seconds = time.perf_counter() - t0
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert report["smoke"] and report["environment"]["interpreter"]
    s = report["sections"]
    assert set(s) == {"kernels", "attention", "train", "families"}
    assert all(sec["status"] == "ok" for sec in s.values()), s

    rows = s["kernels"]["rows"]
    kernels = {"lightning", "lasp2 chunk state", "swa", "shortconv", "gated delta"}
    assert {(r["kernel"], r["dtype"]) for r in rows} == {
        (k, d) for k in kernels for d in ("fp32", "bf16")
    }
    assert {r["seed"] for r in rows} == {0, 1}
    assert {r["dtype"] for r in rows if r.get("form") == "parallel"} == {"fp32", "bf16"}
    for r in rows:  # every output and every input gradient was compared
        assert r["ok"] and r["worst"] <= r["tolerance"], r
        assert any(name.startswith("d") for name in r["errors"]), r

    att = s["attention"]["rows"]
    assert [r["T"] for r in att] == [64, 128]
    assert all(r["triton lightning ms"] > 0 and r["sdpa causal ms"] > 0 for r in att)
    assert "fla" in s["attention"]["note"]  # skipped, and said why

    train = s["train"]
    assert train["backend"] == "gloo" and len(train["losses"]) == train["steps"] == 3

    fam = s["families"]["rows"]
    assert len(fam) == 1, fam
    if fam[0]["status"] != "skipped":  # skipped only when the shared CPU ran out of budget
        assert fam[0]["tokens_per_s"] > 0 and fam[0]["flops_per_token"] > 0
        assert 0 < fam[0]["mfu_gemm"]

    table = md.split("### Every check")[1].split("###")[0]
    assert table.count("| kernels |") == len(rows) and "| families |" in table
    assert "parallel state" in table and "| train |" in table
    for heading in ("### Kernels", "### Lightning attention", "### configs/tiny.yaml",
                    "### One training step"):
        assert heading in md
    print(f"gpu_check --smoke: {seconds:.1f} s")


def test_peak_table_matches_device_names():
    from gpu_check import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H200 NVL") == 835.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Future GPU") is None
