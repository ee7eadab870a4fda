"""Every Triton kernel compiles ahead of time for sm_90 (H100/H200) and sm_80 (A100) as a
launch compiles it, fits the target's shared memory, and spills no more registers than
``aot.spill_budget`` (none). No GPU needed: kernels/launches.py calls the wrappers
on CPU tensors with their launches recorded instead of run, binds each as Triton's launcher
binds it (divisibility hints only where the values have them) and compiles every
configuration the autotuner keeps after pruning for the target, in a subprocess without
TRITON_INTERPRET (the interpreter, which the other kernel tests use, checks none of these
limits). This test runs the representative subset ``CI_CALLS``; the whole matrix (every
preset shape, dtype, variant, both targets) is benchmarks/gpu_compile.py's table in
docs/benchmarks.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.kernels.aot import SMEM_LIMIT, spill_budget

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "plait.kernels.launches", "--ci"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows, out.stderr[-3000:]
    return rows


def _name(r):
    return (
        f"{r['op']} {r['kernel']} {r['shape']} {r['dtype']} {r.get('variant', '')} sm_{r['arch']}"
        f" {r.get('warps')}/{r.get('stages')}"
    )


def test_every_kernel_compiles_for_both_targets(rows):
    failed = [f"{_name(r)}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["arch"] for r in rows} == {80, 90}
    ops = {"lightning", "lightning chunk state", "swa", "shortconv", "gated_delta"}
    assert {r["op"] for r in rows} == ops
    based = {(r["kernel"], r["arch"]) for r in rows if r["op"] == "lightning"}
    kernels = {"_state_fwd", "_out_fwd", "_dstate_bwd", "_dv_bwd", "_dqdk_bwd",
               "_chunk_local", "_combine"}  # both state forms
    assert based == {(k, a) for k in kernels for a in (80, 90)}


def test_every_kept_configuration_is_compiled(rows):
    """Autotuning keeps several configurations; each one a run can pick is compiled."""
    configs = {}
    for r in rows:
        configs.setdefault((r["kernel"], r["shape"], r["arch"]), set()).add(
            (r["warps"], r["stages"]))
    assert max(len(c) for c in configs.values()) >= 2, configs


def test_spilling_configurations_are_pruned(rows):
    """Based's fp32 state kernel spills at 8 warps and 3 stages on an H100 (the table
    kernels/spills.json, measured over every unpruned configuration): the wrapper's pruner
    drops it, and what it keeps compiles without spilling."""
    state = [r for r in rows if r["op"] == "lightning" and r["arch"] == 90
             and r["kernel"] == "_state_fwd"]
    assert state and (8, 3) not in {(r["warps"], r["stages"]) for r in state}
    assert "8/3" in state[0]["pruned"] and not any(r["spills"] for r in state)


def test_gradient_kernel_tiles_do_not_spill(rows):
    """dq/dk's own tiles (lightning ``dqdk_meta``): at Based's widths in fp32 (tf32x3) every
    configuration of the shared 32 x 32 tiles spilled (sm_80 1.5-1.8 KB, sm_90 152-192 B);
    with 16 x 16 every one the autotuner keeps compiles clean on both targets, so none is
    pruned for spilling."""
    dqdk = [r for r in rows if r["op"] == "lightning" and r["kernel"] == "_dqdk_bwd"]
    assert {r["arch"] for r in dqdk} == {80, 90}
    assert all(r["ok"] and r["spills"] == 0 for r in dqdk), [_name(r) for r in dqdk]
    assert all("BK=16" in r["key"] and "BV=16" in r["key"] for r in dqdk)
    assert max(len({(r["warps"], r["stages"]) for r in dqdk if r["arch"] == a})
               for a in (80, 90)) >= 2


def test_hints_are_the_ones_a_launch_gives(rows):
    """Based's widths (153 features, 113 values) and T = 1000 get no divisibility hint,
    Bamba's 128 x 64 do: a blanket hint on every integer (what the old compile test added)
    would show here."""
    based = [r for r in rows if r["op"] == "lightning" and r["ok"]]
    assert based and not any({"D", "E", "T"} & set(r["hinted"]) for r in based)
    bamba = [r for r in rows if r["op"] == "lightning chunk state" and r["ok"]]
    assert {r["kernel"] for r in bamba} == {"_state_fwd", "_chunk_local", "_combine"}
    assert all({"D", "E"} <= set(r["hinted"]) for r in bamba if r["kernel"] != "_combine")


def test_shared_memory_fits_the_target(rows):
    over = [
        f"{_name(r)}: {r['shared']} B > {SMEM_LIMIT[r['arch']]}"
        for r in rows
        if r["ok"] and r["shared"] > SMEM_LIMIT[r["arch"]]
    ]
    assert not over, "\n".join(over)


def test_register_spills_within_budget(rows):
    over = [
        f"{_name(r)}: {r['spills']} B spilled ({r['registers']} registers), "
        f"budget {spill_budget(r['arch'], r['dtype'])}"
        for r in rows
        if r["ok"] and r["spills"] > spill_budget(r["arch"], r["dtype"])
    ]
    assert not over, "\n".join(over)


def test_unsupported_shapes_are_refused_at_the_wrapper():
    from plait.kernels.lightning.triton import plan as lightning_plan
    from plait.kernels.swa.triton import plan as swa_plan

    with pytest.raises(ValueError, match="fp32 with head dims over 128"):
        swa_plan(256, 256, torch.float32, 64, interpret=False)
    with pytest.raises(ValueError, match="head dims up to 256"):
        swa_plan(320, 64, torch.bfloat16, 64)
    with pytest.raises(ValueError, match="block must be a power of two"):
        lightning_plan(64, 64, torch.bfloat16, 48)
    # lightning tiles any head dim: a state tile is at most 64 x 64 (32 x 32 in fp32)
    meta = lightning_plan(153, 65, torch.bfloat16, 64, interpret=False)
    assert meta["BK"] <= 64 and meta["BV"] <= 64
    meta = lightning_plan(256, 128, torch.float32, 64, interpret=False)
    assert meta["BK"] == meta["BV"] == 32 and meta["PREC"] == "tf32x3"
