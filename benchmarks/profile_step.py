"""Where one training step's time goes: torch.profiler over plait's real step, summarised.

    python benchmarks/profile_step.py                      # docs/benchmarks.md "profile-step"
    python benchmarks/profile_step.py --preset transnormer-25m --seq-len 8192  # one, printed
    python benchmarks/profile_step.py --preset hybrid-tiny --trace /tmp/step.json  # + trace
    python benchmarks/profile_step.py --blocks --preset based-25m --seq-len 8192   # per letter
    python benchmarks/profile_step.py --phases --preset hybrid-tiny --steps 20     # fwd/bwd/opt

The step is benchmarks/train_step.py's (configs/tiny.yaml's run config, the preset, micro-batch
1, fp32, one process, packed documents of mean 1024 tokens, launcher.loop.train_step), so the
figures here explain that table. After two warm-up steps, ``--steps`` steps are timed (wall
and process CPU time) and then profiled (CPU activities, no shapes or stacks, which would
inflate the overhead being measured).

Every operator's self time falls in one category (``CATEGORIES``, by operator name):
matrix products, attention kernels, element-wise arithmetic, copies and layout changes,
reductions and norms, the optimizer's own operators and communication. What the profiler does
not see, the step's wall time minus the operators' self time, is Python and dispatch overhead
between operators (module calls, autograd bookkeeping, DeepSpeed's engine). The summary also
gives the model FLOPs utilisation: model FLOPs per token (plait.models.common.cost) x tokens/s
over the fp32 GEMM rate measured in the same process, and the share of the step the matrix
products take, whose ratio is the rate the GEMMs themselves reach.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTION = "profile-step"
DOC_RUNS = [("hybrid-tiny", 2048), ("hybrid-25m", 2048), ("transnormer-25m", 16384)]
"""(preset, tokens) profiled for docs/benchmarks.md."""

CATEGORIES: dict[str, tuple[str, ...]] = {
    "matrix products (mm, bmm, addmm, baddbmm, linear)": (
        "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::linear",
        "aten::matmul", "aten::_addmm_activation", "aten::addbmm",
    ),
    "attention kernels (SDPA flash / math)": ("aten::_scaled_dot_product",),
    "copies and layout (copy_, cat, stack, clone, contiguous, to)": (
        "aten::copy_", "aten::cat", "aten::stack", "aten::clone", "aten::contiguous",
        "aten::_to_copy", "aten::to", "aten::index", "aten::gather", "aten::scatter",
        "aten::index_put", "aten::repeat", "aten::flip", "aten::fill_", "aten::zero_",
        "aten::zeros", "aten::empty", "aten::empty_strided", "aten::new_zeros",
        "aten::ones", "aten::full", "aten::arange",
    ),
    "reductions and norms (sum, mean, norm, max, softmax)": (
        "aten::sum", "aten::mean", "aten::linalg_vector_norm", "aten::norm", "aten::max",
        "aten::min", "aten::amax", "aten::_softmax", "aten::_log_softmax", "aten::rsqrt",
        "aten::var", "aten::cumsum", "aten::argmax", "aten::any", "aten::all",
        "aten::nll_loss", "aten::_log_softmax_backward", "aten::_softmax_backward",
        "aten::nll_loss_backward",
    ),
    "communication (all-reduce, all-gather: one rank here)": ("c10d::", "gloo"),
}
ELEMENTWISE = "element-wise arithmetic (mul, add, exp, silu, ...)"
VIEWS = ("aten::view", "aten::as_strided", "aten::reshape", "aten::unsqueeze", "aten::select",
         "aten::slice", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
         "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::unbind", "aten::split",
         "aten::narrow", "aten::squeeze", "aten::chunk", "aten::lift_fresh",
         "aten::_reshape_alias", "aten::resolve_conj", "aten::resolve_neg")


def category(name: str) -> str | None:
    """The category of an operator event; None for events that are not operators (autograd
    nodes, user scopes: their self time is the Python around the operators they wrap) and for
    views (metadata only: their time is dispatch overhead)."""
    if not name.startswith(("aten::", "c10d::", "gloo")):
        return None
    if name in VIEWS:
        return "views (metadata only)"
    for cat, prefixes in CATEGORIES.items():
        if name.startswith(prefixes):
            return cat
    return ELEMENTWISE


def profile(preset: str, T: int, masking: bool, steps: int, trace: str = "") -> dict:
    import torch
    import train_step as ts
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    job = ts.Job(name=preset, kind="plait", preset=preset, lengths=[T], masking=masking)
    step, flops, n_params = ts._plait_model(job)
    lengths = ts.document_lengths(T, 1024, seed=0)
    rows = ts._Rows(ts.batch(T, ts.VOCAB, lengths, seed=T))
    for _ in range(2):
        step(T, rows)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(T, rows)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    gemm = ts.gemm_rate(2048, reps=5)[0]
    t0 = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(T, rows)
    profiled_wall = (time.perf_counter() - t0) / steps
    if trace:
        prof.export_chrome_trace(trace)
    per_cat: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    per_op: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        cat = category(e.key)
        if cat is None:
            continue
        per_cat[cat] += e.self_cpu_time_total / 1e6 / steps
        calls[cat] += e.count // steps
        per_op[e.key] += e.self_cpu_time_total / 1e6 / steps
    ops_s = sum(per_cat.values())
    med = statistics.median(wall)
    f = flops(T, lengths if masking else [T])
    return {
        "preset": preset, "T": T, "masking": masking, "docs": len(lengths),
        "params": n_params, "threads": torch.get_num_threads(),
        "wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP's default, as in a run)"),
        "step_s": med, "cpu_s": statistics.median(cpu), "profiled_step_s": profiled_wall,
        "tokens_per_s": T / med, "flops_per_token": f, "gemm_gflops": gemm,
        "mfu": T / med * f / (gemm * 1e9),
        "categories": dict(per_cat), "calls": dict(calls),
        "overhead_s": max(profiled_wall - ops_s, 0.0),
        "top_ops": sorted(per_op.items(), key=lambda kv: -kv[1])[:12],
    }


def summary(r: dict) -> str:
    from common import machine

    p = r["profiled_step_s"]
    gemm_cat = next(c for c in CATEGORIES if c.startswith("matrix"))
    gemm_share = r["categories"].get(gemm_cat, 0.0) / p
    lines = [
        f"{r['preset']} ({r['params'] / 1e6:.1f}M parameters), {r['T']} tokens, documents "
        f"{'masked' if r['masking'] else 'not masked'} ({r['docs']} in the row); "
        f"{r['threads']} threads, OMP_WAIT_POLICY {r.get('wait_policy', 'PASSIVE')}.",
        "",
        f"- step {r['step_s'] * 1e3:.0f} ms (median; profiled {p * 1e3:.0f} ms), "
        f"{r['tokens_per_s']:,.0f} tokens/s, {r['flops_per_token'] / 1e6:.1f} MFLOP/token, "
        f"fp32 GEMM {r['gemm_gflops']:.0f} GFLOP/s: **MFU {r['mfu'] * 100:.1f}%**",
        f"- the matrix products take {gemm_share * 100:.0f}% of the step, the rest is what "
        "the table below lists (attention kernels do their own products; their FLOPs are in "
        "the model FLOPs too)",
        "",
        "| where the step goes | ms | share | operator calls |",
        "|---|---|---|---|",
    ]
    cats = sorted(r["categories"].items(), key=lambda kv: -kv[1])
    for cat, s in cats:
        lines.append(f"| {cat} | {s * 1e3:.1f} | {s / p * 100:.0f}% | {r['calls'][cat]:,} |")
    o = r["overhead_s"]
    lines.append(
        f"| Python and dispatch between operators (step - operators) | {o * 1e3:.1f} "
        f"| {o / p * 100:.0f}% | - |"
    )
    lines += ["", "Top operators (self time per step, ms): " + ", ".join(
        f"{k.removeprefix('aten::')} {v * 1e3:.1f}" for k, v in r["top_ops"][:8])]
    return f"Machine: {machine()}\n\n" + "\n".join(lines)


def _run_one(preset: str, T: int, steps: int) -> dict:
    """One profile in a fresh process (each builds its own runtime and DeepSpeed engine)."""
    import json
    import subprocess

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", preset, "--seq-len", str(T),
           "--steps", str(steps), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(next(x for x in out.splitlines() if x.startswith("PROFILE "))[8:])


def phases(preset: str, T: int, steps: int) -> str:
    """The step's three phases apart: the DeepSpeed engine's forward, backward and optimizer
    step (ZeRO's bookkeeping and the client optimizer), each timed inside
    ``launcher.loop.train_step``; medians over ``steps`` steps after three warm-up steps."""
    import train_step as ts

    job = ts.Job(name=preset, kind="plait", preset=preset, lengths=[T], masking=True)
    step, _, _ = ts._plait_model(job)
    engine = step.engine
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer step": []}
    for name, attr in (("forward", "forward"), ("backward", "backward"),
                       ("optimizer step", "step")):
        fn = getattr(engine, attr)

        def timed(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            out = _fn(*a, **k)
            times[_name].append(time.perf_counter() - t0)
            return out

        setattr(engine, attr, timed)
    rows = ts._Rows(ts.batch(T, ts.VOCAB, ts.document_lengths(T, 1024, seed=0), seed=T))
    total = []
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        step(T, rows)
        total.append(time.perf_counter() - t0)
    med = {k: statistics.median(v[3:]) * 1e3 for k, v in times.items()}
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"{preset}, {T} tokens, OMP_WAIT_POLICY {policy}, medians of {steps} steps (ms): "
            f"step {statistics.median(total[3:]) * 1e3:.1f}, "
            + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))


def blocks(preset: str, T: int, reps: int) -> str:
    """Forward + backward of each letter's first block at ``T`` tokens of packed documents,
    its two halves apart (``Block.mix``, the mixer with its norm; ``Block.channel``, the MLP
    with its norm), median of ``reps`` after one warm-up: which layer of a preset the step's
    time goes to."""
    import torch
    import train_step as ts

    from plait.launcher.config import load_config
    from plait.models.common import build_model
    from plait.parallel import runtime

    cfg = load_config(ts.REPO / "configs" / "tiny.yaml", [f"model.preset={preset}"])
    runtime.initialize(cfg.parallel, cfg.training.seed, cpu_heap=cfg.training.cpu_heap)
    model = build_model(cfg.model, 1, vocab_size=ts.VOCAB)
    lengths = ts.document_lengths(T, 1024, seed=0)
    docs = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    x = torch.randn(1, T, cfg.model.hidden_size)
    lines = [f"{preset}, {T} tokens ({len(lengths)} documents), forward + backward, ms:", "",
             "| letter | layers | mixer half | MLP half |", "|---|---|---|---|"]
    for letter in dict.fromkeys(cfg.model.pattern):
        blk = next(b for b in model.blocks if b.letter == letter)
        times = []
        for half in (functools.partial(blk.mix, positions_BT=pos, doc_ids_BT=docs), blk.channel):
            t = []
            for _ in range(reps + 1):
                a = x.clone().requires_grad_()
                t0 = time.perf_counter()
                half(a).sum().backward()
                t.append(time.perf_counter() - t0)
            times.append(statistics.median(t[1:]) * 1e3)
        n = cfg.model.pattern.count(letter)
        lines.append(f"| {letter} | {n} | {times[0]:,.0f} | {times[1]:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--preset", default="", help="one preset, printed only (default: the doc's set)"
    )
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--trace", default="", help="write the Chrome trace here (with --preset)")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--phases",
        action="store_true",
        help="time forward, backward and optimizer step apart (with --preset)",
    )
    ap.add_argument("--blocks", action="store_true",
                    help="time each letter's block halves instead (with --preset)")
    args = ap.parse_args(argv)
    if args.blocks:
        print(blocks(args.preset or "based-25m", args.seq_len, args.steps))
        return 0
    if args.phases:
        print(phases(args.preset or "hybrid-tiny", args.seq_len, args.steps))
        return 0
    if args.preset:  # the allocator as the run config sets it (runtime.initialize in profile)
        r = profile(args.preset, args.seq_len, True, args.steps, args.trace)
        if args.json:
            import json

            print("PROFILE " + json.dumps(r), flush=True)
        else:
            print(summary(r))
        return 0
    parts = []
    for preset, T in DOC_RUNS:
        parts.append(summary(_run_one(preset, T, args.steps)))
        print(parts[-1], flush=True)
    from common import write_section

    cmd = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/profile_step.py"
    write_section(
        SECTION,
        "\n\n".join(
            ["## Where a training step's time goes (CPU profile)", f"Command: `{cmd}`"] + parts
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
