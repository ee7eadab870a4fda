"""``training.cpu_heap`` side by side: step time, kernel time and peak memory per setting.

    python benchmarks/cpu_heap.py                      # transnormer-25m, based-25m at 16K
    python benchmarks/cpu_heap.py --models h3-25m --steps 1
    python benchmarks/cpu_heap.py --write              # results so far -> docs

The heap setting is a process's (glibc's malloc), so each (model, setting) is a fresh
process through plait's real training path (benchmarks/long_sequence.py's worker: the run
config, runtime, DeepSpeed ZeRO-1 + LAMB, ``launcher.loop.train_step``; one random row of
micro-batch 1, fp32, nothing masked), and the settings take turns within each round so that
the machine's drift falls on all of them alike. Measured per process: the first step, the
median of ``--steps`` more, the kernel (system) CPU time of those steps, the peak resident
set (VmHWM) and how many times ``bounded`` trimmed the heap. Results are kept in
``--results`` (JSON lines); ``--write`` turns them into docs/benchmarks.md's "cpu-heap".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import long_sequence  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "runs" / "cpu_heap.jsonl"
SECTION = "cpu-heap"


def summary(rec: dict) -> dict:
    """One process's figures (its first rank's), or its error."""
    if rec["error"] or not rec["ranks"]:
        return {"error": rec["error"] or "no result"}
    r = rec["ranks"][0]
    timed = r["times"][1:] or r["times"]
    system = r["system_s"][1:] or r["system_s"]
    return {"first_s": r["times"][0], "step_s": statistics.median(timed),
            "system_s": statistics.median(system), "peak_gib": r["peak_gib"],
            "trims": r["heap_trims"], "loss": r["losses"][-1]}


def table(records: list[dict]) -> str:
    """Rows per (model, length): each setting's figures, every round's step listed."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for rec in records:
        groups.setdefault((rec["preset"], rec["length"]), {}).setdefault(
            rec["cpu_heap"], []).append(summary(rec))
    lines = [
        "| model | tokens | cpu_heap | step, median (s) | vs release | kernel time per step (s) "
        "| peak RSS (GiB) | vs release | heap trims | first step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (preset, T), by in groups.items():
        base = [s for s in by.get("release", []) if "error" not in s]
        b_step = statistics.median(s["step_s"] for s in base) if base else None
        b_peak = max(s["peak_gib"] for s in base) if base else None
        for setting in long_sequence._heap_settings():
            runs = by.get(setting, [])
            ok = [s for s in runs if "error" not in s]
            name = setting + (" (default)" if setting == "bounded" else "")
            head = f"| {preset} | {T // 1024}K | {name} "
            if not ok:
                if runs:
                    lines.append(head + f"| failed: {runs[0]['error']} | | | | | | |")
                continue
            step = statistics.median(s["step_s"] for s in ok)
            peak = max(s["peak_gib"] for s in ok)
            steps = ", ".join(f"{s['step_s']:.1f}" for s in ok)
            trims = ", ".join("-" if s["trims"] is None else str(s["trims"]) for s in ok)
            vs_step = f"{step / b_step:.2f}x" if b_step else "-"
            vs_peak = f"{peak / b_peak:.2f}x" if b_peak else "-"
            system = statistics.median(s["system_s"] for s in ok)
            first = statistics.median(s["first_s"] for s in ok)
            lines.append(head + f"| {step:.1f} ({steps}) | {vs_step} | {system:.1f} "
                         f"| {peak:.2f} | {vs_peak} | {trims} | {first:.1f} |")
    return "\n".join(lines)


def write_doc(records: list[dict], notes: str) -> None:
    from common import machine, write_section

    body = f"""## The CPU heap at 16K (glibc's mmap; 2026-12-07)

`python benchmarks/cpu_heap.py` ({machine()}; OMP_WAIT_POLICY=PASSIVE, 2 threads per
process): each model and setting in a fresh process through plait's training path
(benchmarks/long_sequence.py's worker: DeepSpeed ZeRO-1 + LAMB, one random row of
micro-batch 1, fp32), the settings taking turns in every round. "kernel time" is the
process's system CPU time per step (page faults and the kernel's zeroing of fresh pages);
peak RSS is the process's whole peak (VmHWM). parallel/cpu_heap.py says what each setting
does; `bounded` is the default.

{table(records)}

{notes}
"""
    write_section(SECTION, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="transnormer-25m,based-25m")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--settings", default=",".join(long_sequence._heap_settings()))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per process (s)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--write", action="store_true", help="write the docs section")
    ap.add_argument("--notes", default="", help="a file whose text follows the table")
    args = ap.parse_args(argv)
    results = Path(args.results)
    settings = [s for s in args.settings.split(",") if s]
    bad = [s for s in settings if s not in long_sequence._heap_settings()]
    if bad:
        ap.error(f"--settings: {bad} not in {list(long_sequence._heap_settings())}")
    from plait.models.common.family import presets

    unknown = [m for m in args.models.split(",") if m not in presets()]
    if unknown:
        ap.error(f"--models: {unknown} are not presets (plait.models.presets)")
    if not args.write:
        for rnd in range(args.rounds):
            for model in args.models.split(","):
                for setting in settings:
                    rec = long_sequence.run(args.length, 1, args.recompute, args.steps,
                                            limit=float("inf"), timeout=args.timeout,
                                            preset=model, cpu_heap=setting)
                    rec["round"] = rnd
                    s = summary(rec)
                    print(f"round {rnd} {model} {setting}: {json.dumps(s)}", flush=True)
                    long_sequence.keep_record(results, rec)
    if args.write:
        notes = Path(args.notes).read_text() if args.notes else ""
        write_doc(long_sequence.load_records(results), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
