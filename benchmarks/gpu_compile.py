"""Ahead-of-time compile table of the Triton kernels (no GPU needed), into docs/benchmarks.md.

Every kernel launch at every preset shape (kernels/aot.py's matrix: lightning at
TransNormerLLM's and Based's head dims, sliding window at Based's and the generic 128/256,
the short convolution at K = 3, 4, the gated delta rule's chunk scan at Qwen3.5's 128 x 128
heads (and 128 x 256 under context parallelism), gdn-25m's and gdn-tiny's), bf16 and fp32,
with and without documents and initial state, compiled for sm_90 and sm_80 with Triton's own
compiler and ptxas: shared memory, registers and spill bytes per thread.
tests/kernels/test_gpu_compile.py asserts the limits on a quick subset.

    .venv/bin/python benchmarks/gpu_compile.py     # about 7 minutes on 2 cores, cold cache
                                                   # (seconds warm: kernels/aot.py)
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


def run_matrix() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "plait.kernels.aot"], cwd=ROOT, env=env,
        capture_output=True, text=True, check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def table(rows: list[dict]) -> str:
    """One line per (op, shape, dtype, arch, kernel), the variants folded into the worst
    figure (max shared memory, registers, spills) and listed."""
    import triton

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"], r["arch"], r["kernel"])].append(r)
    lines = [
        "Compiled ahead of time with Triton "
        f"{triton.__version__} and its bundled ptxas; no GPU. Shared memory limit per block: "
        f"sm_90 {SMEM_LIMIT[90]:,} B, sm_80 {SMEM_LIMIT[80]:,} B. Spill budget: 0 B, except "
        f"fp32 on sm_80 ({spill_budget(80, 'fp32')} B). Worst figure over the variants "
        "(docs = packed documents, init = initial state). warps/stages: the launch config "
        "compiled (lightning and sliding window: the first autotune config their shared-memory "
        "pruners keep on an H100, the fewest warps that do not spill with the most stages that "
        "fit; what runs with PLAIT_TRITON_AUTOTUNE=0). fp32 sliding window with heads over 128 "
        "is refused at the wrapper.",
        "",
        "| op | shape | dtype | target | kernel | variants | compiles | shared B | regs "
        "| spill B | warps/stages |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    failures = 0
    for (op, shape, dtype, arch, kernel), rs in groups.items():
        ok = all(r["ok"] for r in rs)
        variants = ", ".join(r["variant"] for r in rs)
        if not ok:
            failures += 1
            lines.append(f"| {op} | {shape} | {dtype} | sm_{arch} | {kernel} | {variants} "
                         f"| **no** | | | | |")
            continue
        shared = max(r["shared"] for r in rs)
        regs = max(r["registers"] for r in rs)
        spills = max(r["spills"] for r in rs)
        flag = (
            "" if shared <= SMEM_LIMIT[arch] and spills <= spill_budget(arch, dtype) else " **!**"
        )
        lines.append(
            f"| {op} | {shape} | {dtype} | sm_{arch} | {kernel} | {variants} | yes{flag} "
            f"| {shared:,} | {regs} | {spills} | {rs[0]['num_warps']}/{rs[0]['num_stages']} |"
        )
    lines.append("")
    lines.append(f"{len(rows)} launches compiled, {failures} failures.")
    return "\n".join(lines)


def main() -> None:
    rows = run_matrix()
    body = "## Triton kernels compiled ahead of time (sm_90, sm_80)\n\n"
    body += "`.venv/bin/python benchmarks/gpu_compile.py`\n\n" + table(rows)
    write_section("gpu_compile", body)
    print(body)


if __name__ == "__main__":
    main()
