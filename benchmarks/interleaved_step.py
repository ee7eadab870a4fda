"""Training-step speed ratios measured side by side: the models in one process, steps in turn.

    python benchmarks/interleaved_step.py --write     # docs/benchmarks.md, 8K, three models
    python benchmarks/interleaved_step.py --length 16384 \
        --models "Llama (transformers),transnormer-25m"
    python benchmarks/interleaved_step.py --smoke     # tiny shapes, seconds (tests)

benchmarks/train_step.py runs each model in its own process, one after another. On a machine
whose speed drifts, a ratio from such a run compares two different machines: on this 2-core
VM the fp32 GEMM rate went from 132 to 180 GFLOP/s within one 5-minute run, and the Llama
baseline's 8K tokens/s from 353 to 266 between two runs an hour apart. Here every model is
built in the same process (train_step's ``_plait_model`` and ``_llama_model``: the same step,
rows and FLOP accounting) and warmed up; then the models take one step each in turn, for
``--rounds`` rounds. Each round's ratio (a model's tokens/s over the first model's) comes from
steps seconds apart; the table gives the median of the rounds' ratios and their range, each
model's median step, tokens/s and tokens per CPU-second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTION = "train-step-interleaved"
DEFAULT_MODELS = "Llama (transformers),transnormer-25m,based-25m"


def _jobs(names: list[str], T: int, smoke: bool):
    import train_step as ts

    pool = ts.jobs_smoke() if smoke else ts.jobs_25m([T], 1, 1e9, 1024)
    by_name = {j.name: j for j in pool}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"interleaved_step: unknown model(s) {missing}; known: {sorted(by_name)}")
    jobs = [by_name[n] for n in names]
    for j in jobs:
        j.lengths = [T]
    return jobs


def run(names: list[str], T: int, rounds: int, smoke: bool = False, sets=()) -> dict:
    import torch
    import train_step as ts

    jobs = [ts.with_sets(j, sets) for j in _jobs(names, T, smoke)]
    if smoke:
        torch.set_num_threads(1)
    vocab, doc_mean = jobs[0].vocab, jobs[0].doc_mean
    lengths = ts.document_lengths(T, doc_mean, seed=0)
    rows = ts._Rows(ts.batch(T, vocab, lengths, seed=T))
    models = []
    for job in jobs:
        step, flops, n_params = (ts._plait_model if job.kind == "plait" else ts._llama_model)(job)
        models.append((job.name, step, flops(T, lengths), n_params))
    gemm = [ts.gemm_rate(jobs[0].gemm_n, reps=5)[0]]
    for _, step, _, _ in models:  # warm-up: gradients, optimizer state, allocator pool
        step(T, rows)
    wall = {name: [] for name, *_ in models}
    cpu = {name: [] for name, *_ in models}
    for r in range(rounds):
        for name, step, _, _ in models:
            t0, c0 = time.perf_counter(), time.process_time()
            step(T, rows)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {wall[n][-1]:.1f} s" for n, *_ in models), flush=True)
    gemm.append(ts.gemm_rate(jobs[0].gemm_n, reps=5)[0])
    base = models[0][0]
    out = {"T": T, "rounds": rounds, "sets": list(sets), "gemm": gemm, "gemm_n": jobs[0].gemm_n,
           "doc_mean": doc_mean, "models": []}
    for name, _, f, n_params in models:
        ratios = [b / w for b, w in zip(wall[base], wall[name], strict=True)]
        med = statistics.median(wall[name])
        out["models"].append({
            "name": name, "params": n_params, "flops_per_token": f, "step_s": med,
            "tokens_per_s": T / med, "tokens_per_cpu_s": T / statistics.median(cpu[name]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "mfu": T / med * f / (max(gemm) * 1e9),
        })
    return out


def models_flag(names: list[str]) -> str:
    """The ``--models`` part of the command line, when not the default."""
    return "" if ",".join(names) == DEFAULT_MODELS else f' --models "{",".join(names)}"'


def table(r: dict) -> str:
    import train_step as ts
    from common import machine

    base = r["models"][0]["name"]
    lines = [
        f"`python benchmarks/interleaved_step.py --length {r['T']}"
        + models_flag([m["name"] for m in r["models"]])
        + f" --rounds {r['rounds']}"
        + ts.set_flags(r.get("sets", []))
        + "`; "
        f"{machine()}; fp32, "
        f"micro-batch 1, one process holding every model, {r['T']:,} tokens of packed "
        f"documents (mean {r['doc_mean']}), one warm-up step each, then {r['rounds']} rounds "
        f"of one step per model in turn. fp32 GEMM (n = {r['gemm_n']}, best of 5): "
        f"{r['gemm'][0]:.0f} GFLOP/s before the rounds, {r['gemm'][1]:.0f} after; MFU against "
        "the higher.",
        "",
        f"| model | parameters | step, median (s) | tokens/s | tokens per CPU-s | vs {base}: "
        "median of the rounds (range) | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in r["models"]:
        ratio = (
            "1.00x"
            if m["name"] == base
            else f"{m['ratio']:.2f}x ({m['ratio_min']:.2f}-{m['ratio_max']:.2f})"
        )
        lines.append(
            f"| {m['name']} | {m['params'] / 1e6:.1f}M | {m['step_s']:.2f} | "
            f"{m['tokens_per_s']:,.0f} | {m['tokens_per_cpu_s']:,.0f} | {ratio} | "
            f"{m['mfu'] * 100:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated; the first is "
                    "the baseline (names as in benchmarks/train_step.py)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; prints, no docs edit")
    ap.add_argument("--write", action="store_true", help="write the docs/benchmarks.md section")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-config override for every plait model")
    ap.add_argument("--section", default="", help="the docs/benchmarks.md section to write "
                    "(default: by length, train-step-interleaved[-16k])")
    args = ap.parse_args(argv)
    if args.smoke:
        names = ["Llama (transformers)", "plait LALA"]
        r = run(names, 64, 2, smoke=True, sets=args.set)
    else:
        r = run([n.strip() for n in args.models.split(",")], args.length, args.rounds,
                sets=args.set)
    text = table(r)
    print(text)
    if args.write and not args.smoke:
        from common import write_section

        if args.length == 8192 and not args.section:
            write_section(SECTION, "## Training-step ratios, models side by side (CPU)\n\n" + text)
        else:  # a section of its own per length
            title = f"## Training-step ratios at {args.length // 1024}K, models side by side (CPU)"
            if args.section:  # a section beside the standard one: name its models
                title += ": " + ", ".join(m["name"] for m in r["models"][1:])
            name = args.section or f"{SECTION}-{args.length // 1024}k"
            write_section(name, f"{title}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
