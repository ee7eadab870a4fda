"""The longest sequences plait trains on this machine: step time and peak memory per rank.

    python benchmarks/long_sequence.py --compare 32768          # recompute none/selective/full
    python benchmarks/long_sequence.py --length 262144          # one process, 256K tokens
    python benchmarks/long_sequence.py --length 1048576 --cp 4  # CP=4 (LASP-2 + halo), 1M
    python benchmarks/long_sequence.py --write                  # results so far -> docs

The model is ``hybrid-window-tiny`` (configs/tiny.yaml's sizes: 4 layers LWLW, d 128, 4
heads, SwiGLU 384, vocabulary 2048): lightning attention and sliding-window attention
(``based.window`` 64 keys), no global softmax layer, so time and memory grow linearly in the
length. Each run goes through plait's real training path in fresh processes: the run config
(configs/tiny.yaml with the preset, ``training.recompute``, ``parallel.context_parallel``),
plait's runtime (gloo ranks started here as torchrun would, one per CP rank), the model,
DeepSpeed's engine (ZeRO-1, LAMB, clipping) and ``launcher.loop.train_step``. One row of
micro-batch 1 is one sequence (``data.document_masking=false``: nothing masked, positions
run over the whole row), random tokens. Measured: the first step (it allocates the
gradients and optimizer state) and the median of ``--steps`` more; peak memory per rank as
the peak resident set (VmHWM) of the process over the whole run, and its growth over the
resident set after the model and engine were built. Threads: the machine's cores divided
among the ranks (at least 1). Each run's results are kept in ``--results`` (JSON lines) and
``--write`` turns them into the docs/benchmarks.md section "long-sequence".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parents[1]
PRESET = "hybrid-window-tiny"
VOCAB = 2048
SECTION = "long-sequence"
RESULTS = REPO / "runs" / "long_sequence.jsonl"


def _modes() -> tuple[str, ...]:
    """``training.recompute``'s choices, from the type that owns them."""
    from typing import get_args

    from plait.models.common.lm import Recompute

    return get_args(Recompute)


def _heap_settings() -> tuple[str, ...]:
    """``training.cpu_heap``'s choices, from the type that owns them."""
    from typing import get_args

    from plait.parallel.cpu_heap import CpuHeap

    return get_args(CpuHeap)


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


class _Row:
    """The loader interface ``train_step`` reads: the same random row every step."""

    def __init__(self, T: int):
        import torch

        seq = torch.randint(0, VOCAB, (1, T + 1), generator=torch.Generator().manual_seed(T))
        zeros = torch.zeros(1, T, dtype=torch.long)
        self.b = {"tokens": seq[:, :-1], "labels": seq[:, 1:], "doc_ids": zeros,
                  "positions": torch.arange(T)[None]}

    def next_micro_batch(self) -> dict:
        return self.b


def worker(job: dict) -> None:
    """One rank (RANK, WORLD_SIZE, MASTER_* in the environment): build, train ``steps + 1``
    steps, print one ``RESULT {json}`` line."""
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    from plait.launcher.config import load_config
    from plait.launcher.engine import build_engine
    from plait.launcher.layout import sequence_parallel_context
    from plait.launcher.loop import Loop
    from plait.models.common import build_model
    from plait.parallel import runtime

    T = job["length"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        f"model.preset={job['preset']}", "training.micro_batch_size=1",
        "training.precision=fp32", "training.eval_every=0", "logging.progress_bar=false",
        "data.document_masking=false", f"data.seq_len={T}",
        f"training.recompute={job['recompute']}", f"parallel.context_parallel={job['cp']}",
    ] + ([f"training.cpu_heap={job['cpu_heap']}"] if job.get("cpu_heap") else []))
    cfg.out_dir = job["out_dir"]
    rt = runtime.initialize(
        cfg.parallel, cfg.training.seed, cpu_heap=cfg.training.cpu_heap
    )
    sp = sequence_parallel_context(cfg)
    model = build_model(cfg.model, rt.tp, vocab_size=VOCAB, sp=sp)
    model.recompute = cfg.training.recompute
    engine, _, scheduler = build_engine(model, cfg, rt)
    rows = _Row(T)
    base = _status_kib("VmRSS")
    times, losses, system = [], [], []
    for _ in range(job["steps"] + 1):
        sys0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        s = Loop(cfg, rt, engine, scheduler, rows, sp=sp).step()
        system.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys0)
        times.append(s.step_time_s)
        losses.append(s.loss)
        if times[0] > job["limit"]:
            break
    peak = _status_kib("VmHWM")
    out = {
        "rank": rt.rank, "length": T, "cp": rt.cp, "recompute": job["recompute"],
        "preset": job["preset"], "threads": job["threads"], "first_s": times[0],
        "median_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "times": times, "losses": losses, "peak_gib": peak / 2**20,
        "growth_gib": (peak - base) / 2**20, "base_gib": base / 2**20, "system_s": system,
        "cpu_heap": cfg.training.cpu_heap, "heap_trims": rt.heap.trims if rt.heap else None,
        "load": os.getloadavg()[0],
    }
    print("RESULT " + json.dumps(out), flush=True)
    runtime.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(length: int, cp: int, recompute: str, steps: int, limit: float, timeout: float,
        preset: str = PRESET, cpu_heap: str | None = None) -> dict:
    """Start ``cp`` ranks (one process each, gloo), wait, return the run's record: per-rank
    results, or the error of the first rank that failed."""
    threads = max(1, (os.cpu_count() or 1) // cp)
    port = _free_port()
    job = {"length": length, "cp": cp, "recompute": recompute, "steps": steps,
           "limit": limit, "threads": threads, "preset": preset, "cpu_heap": cpu_heap,
           "out_dir": f"/tmp/plait-long-sequence-{os.getpid()}"}
    procs = []
    for rank in range(cp):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(cp), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                   OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(job)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=REPO))
    t0 = time.time()
    ranks, errors = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            out, err = p.communicate()
            errors.append(f"killed after {timeout:.0f} s")
        got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        ranks += got
        if not got and p.returncode:
            tail = [line for line in err.splitlines() if line.strip()][-3:]
            errors.append(f"exit {p.returncode} ({p.returncode == -9 and 'killed' or 'error'}): "
                          + " | ".join(tail))
    rec = {"length": length, "cp": cp, "recompute": recompute, "preset": preset,
           "cpu_heap": cpu_heap,
           "ranks": sorted(ranks, key=lambda r: r["rank"]), "error": "; ".join(errors),
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return rec


def _fmt_len(T: int) -> str:
    if T % 2**20 == 0:
        return f"{T >> 20}M"
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def table(records: list[dict]) -> str:
    lines = [
        "| tokens per sequence | CP ranks | recompute | first step (s) | step, median (s) "
        "| tokens/s | peak RSS per rank (GiB) | growth over the built model (GiB) | loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        head = f"| {_fmt_len(r['length'])} | {r['cp']} | {r['recompute']} "
        if r["error"] or not r["ranks"]:
            lines.append(head + f"| failed: {r['error'] or 'no result'} | | | | | |")
            continue
        ks = r["ranks"]
        first = max(k["first_s"] for k in ks)
        med = [k["median_s"] for k in ks if k["median_s"] is not None]
        step = max(med) if med else None
        peak = " / ".join(f"{k['peak_gib']:.2f}" for k in ks)
        growth = " / ".join(f"{k['growth_gib']:.2f}" for k in ks)
        tps = f"{r['length'] / (step or first):,.0f}"
        lines.append(
            head + f"| {first:.1f} | {f'{step:.1f}' if step else '-'} | {tps} | {peak} "
            f"| {growth} | {ks[0]['losses'][-1]:.3f} |"
        )
    return "\n".join(lines)


def write_doc(records: list[dict], notes: str) -> None:
    from common import machine, write_section

    body = f"""## Long sequences: the linear + window preset at 256K tokens and, with CP=4, 1M

`{PRESET}` (configs/tiny.yaml's sizes, pattern LWLW: lightning attention and sliding-window
attention of 64 keys, no global softmax layer), one sequence of micro-batch 1 per step,
fp32, through plait's training path (run config, runtime, DeepSpeed ZeRO-1 + LAMB,
`launcher.loop.train_step`); CP ranks are gloo processes on this machine ({machine()}),
sharing its cores (threads per rank: cores / ranks). Peak RSS is each rank's whole-process
peak (VmHWM: Python, torch, DeepSpeed and the model included); growth is that peak less
the resident set once the model and engine were built. "first step" allocates the
gradients and LAMB state; the median is over the steps after it. Commands:
`python benchmarks/long_sequence.py --length 262144 --recompute selective --steps 1`,
`... --length 1048576 --cp 4 --recompute full --steps 0`, `... --compare 32768 --steps 1`,
then `... --write --notes <the text below>`.

{table(records)}

{notes}
"""
    write_section(SECTION, body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, nargs="+", default=[])
    ap.add_argument("--cp", type=int, default=1, help="context-parallel ranks (processes)")
    ap.add_argument("--recompute", default="selective", choices=_modes())
    ap.add_argument(
        "--compare",
        type=int,
        default=0,
        help="run this length once per recompute mode (none, selective, full)",
    )
    ap.add_argument("--steps", type=int, default=2, help="timed steps after the first")
    ap.add_argument(
        "--limit",
        type=float,
        default=240.0,
        help="stop after the first step when it takes longer (s)",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="per run (s)")
    ap.add_argument("--preset", default=PRESET)
    ap.add_argument("--cpu-heap", default=None, choices=_heap_settings(),
                    help="training.cpu_heap for the ranks (default: the config's)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--write", action="store_true", help="write the docs section")
    ap.add_argument("--notes", default="", help="a file whose text follows the table")
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    runs = [(T, args.cp, args.recompute) for T in args.length]
    if args.compare:
        runs += [(args.compare, args.cp, m) for m in _modes()]
    results = Path(args.results)
    for T, cp, mode in runs:
        rec = run(T, cp, mode, args.steps, args.limit, args.timeout, args.preset,
                  args.cpu_heap)
        print(table([rec]).splitlines()[-1], flush=True)
        keep_record(results, rec)
    if args.write:
        write_doc(load_records(results), Path(args.notes).read_text() if args.notes else "")
    return 0


def keep_record(results: Path, rec: dict) -> None:
    """Append one run's record to the results file (JSON lines)."""
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def load_records(results: Path) -> list[dict]:
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    sys.exit(main())
