"""Ahead-of-time compile table of the Triton kernels (no GPU needed), into docs/benchmarks.md.

Launch-faithful (kernels/launches.py): every wrapper is called forward and backward at every
preset shape (lightning at TransNormerLLM's, Based's and Bamba's head dims, with and without
per-token decays, documents and initial state, and its chunk state; sliding window at
Based's and the generic widths; the short convolution at K = 3, 4; the gated delta scan at
Qwen3.5's heads and under CP), bf16 and fp32, T = 1000 and 8192, with its launches recorded
instead of run; each launch is bound as Triton's launcher binds it and compiled for sm_90
and sm_80 under every configuration its autotuner keeps after pruning for that target, with
Triton's own compiler and ptxas: shared memory, registers and spill bytes per thread.
tests/kernels/test_gpu_compile.py asserts the limits on a representative subset.

    .venv/bin/python benchmarks/gpu_compile.py     # tens of minutes on 2 cores, cold cache
                                                   # (Triton's cache and kernels/aot.py's
                                                   # ptxas cache make a rerun fast)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]

from common import write_section  # noqa: E402

from plait.kernels.aot import SMEM_LIMIT, spill_budget  # noqa: E402


def run_matrix(*flags: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "plait.kernels.launches", *flags], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def write_spill_table(rows: list[dict]) -> dict[str, int]:
    """kernels/spills.json: every autotuned configuration that spilled, with its bytes per
    thread (the pruners drop them while a configuration that does not spill is left)."""
    from plait.kernels.triton_common import SPILL_TABLE

    table = {r["key"]: r["spills"] for r in rows if r["ok"] and r["spills"] and r.get("key")}
    Path(SPILL_TABLE).write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    return table


def table(rows: list[dict]) -> str:
    """One line per (op, shape, dtype, arch, kernel): the configurations kept (warps/stages),
    those the pruner drops, the worst figure over them and over the variants."""
    import triton

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"], r["arch"], r["kernel"])].append(r)
    lines = [
        "Compiled ahead of time with Triton "
        f"{triton.__version__} and its bundled ptxas; no GPU. Each launch is made by the "
        "wrapper itself (recorded, not run) and bound as Triton binds a launch from torch "
        "tensors (divisibility hints only where the values have them); every configuration "
        "the autotuner keeps after pruning for the target is compiled. Shared memory limit "
        f"per block: sm_90 {SMEM_LIMIT[90]:,} B, sm_80 {SMEM_LIMIT[80]:,} B. Spill budget: "
        f"{spill_budget(80, 'fp32')} B on both targets in both dtypes. Worst figure over the "
        "kept configurations and the variants (T, docs = packed documents, init = initial "
        "state). hinted: the integer arguments that got a 16-divisibility hint.",
        "",
        "| op | shape | dtype | target | kernel | kept (warps/stages) | pruned | compiles "
        "| shared B | regs | spill B | hinted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failures = 0
    for (op, shape, dtype, arch, kernel), rs in groups.items():
        kept = sorted({f"{r['warps']}/{r['stages']}" for r in rs})
        pruned = sorted({p for r in rs for p in r.get("pruned", [])} - set(kept))
        head = (f"| {op} | {shape} | {dtype} | sm_{arch} | {kernel} | {', '.join(kept)} "
                f"| {', '.join(pruned) or '-'} ")
        if not all(r["ok"] for r in rs):
            failures += 1
            lines.append(head + "| **no** | | | | |")
            continue
        shared = max(r["shared"] for r in rs)
        regs = max(r["registers"] for r in rs)
        spills = max(r["spills"] for r in rs)
        hinted = sorted({h for r in rs for h in r.get("hinted", [])})
        flag = (
            "" if shared <= SMEM_LIMIT[arch] and spills <= spill_budget(arch, dtype) else " **!**"
        )
        lines.append(head + f"| yes{flag} | {shared:,} | {regs} | {spills} "
                     f"| {', '.join(hinted) or '-'} |")
    lines.append("")
    lines.append(f"{len(rows)} compiled launch configurations, {failures} failures.")
    return "\n".join(lines)


def main() -> None:
    table_rows = write_spill_table(run_matrix("--all-configs"))
    rows = run_matrix()
    body = "## Triton kernels compiled ahead of time (sm_90, sm_80)\n\n"
    body += "`.venv/bin/python benchmarks/gpu_compile.py`\n\n" + table(rows)
    body += (f"\n\nkernels/spills.json: {len(table_rows)} spilling configurations found among "
             "the unpruned ones (`python -m plait.kernels.launches --all-configs`), which the "
             "pruners drop where a configuration that does not spill is left (the pruned "
             "column).")
    write_section("gpu_compile", body)
    print(body)


if __name__ == "__main__":
    main()
