"""Whole training steps on CPU: plait's families against transformers' LlamaForCausalLM.

    python benchmarks/train_step.py                  # the full run: docs/benchmarks.md section
                                                     # "train-step" and docs/train_step_*.png
    python benchmarks/train_step.py --smoke --out D  # tiny shapes, seconds (tests/benchmarks)

What a researcher compares before choosing plait: one optimizer step (forward, backward,
clipping, update) of micro-batch 1 in fp32 in one process, for

* the ~25M preset of each family (``<family>-25m``, vocabulary 2048, the demo tokenizer's
  size) and plait's all-softmax model of hybrid-25m's shape, trained as a user would: the
  run config configs/tiny.yaml (DeepSpeed ZeRO-1, LAMB, clipping at 1) with the preset and
  ``data.seq_len`` set, driven by launcher.loop.train_step;
* the baseline most users would train instead: transformers' LlamaForCausalLM of
  hybrid-25m's shape (d 512, 8 layers, 8 heads, SwiGLU 1280, tied embeddings), SDPA
  attention, torch.optim.AdamW, clipping at 1, packed rows as plain causal sequences;
* the issue's table at configs/tiny.yaml's sizes (4 layers, d 128): Llama, AAAA, LALA and
  LLLL, with documents masked (plait's default) and with ``data.document_masking=false``.

Rows are packed documents: lengths drawn from an exponential distribution (mean
``--doc-mean`` tokens, seeded per sequence length, the same for every model), positions
restarting at each one. plait masks them (its default); the Llama baseline attends across
them (what transformers does with a packed row and no mask).

Measured, each model in a fresh subprocess with its lengths in increasing order: the median
of ``--steps`` timed steps after one warm-up step at each length (tokens/s = tokens per step
/ median); peak memory as RSS growth, the peak resident set during that length's steps
(VmHWM, reset before the length through /proc/self/clear_refs) minus the resident set
before them, with the model, optimizer state and previous lengths' allocator pool already
in place; model FLOPs per token, 3 x forward: 2 x parameters (the tied head counted once
more as a matmul) plus each letter's ``mixing_flops`` (models/<family>/__init__.py, beside
the letter's cost estimate). With documents masked a mixer's term is averaged over the
documents at their own lengths (the work of training the documents one by one), without
masking it is taken at the row length. MFU is tokens/s x FLOPs per token over the best fp32
GEMM rate (n = 2048, torch.mm) measured in the same run, before and after the models.

Under other load on the cores wall-clock rates drop; the table also gives tokens per
CPU-second (the process's user + system time over all threads) and the load average, so a
reader can tell a slow model from a busy machine.

A model stops at the first length where one step takes longer than ``--limit`` seconds
(the warm-up step is the one that decides). A length is not run when the previous one's
median step, scaled by the ratio of FLOPs per step, predicts more than that: the table
says which and the predicted time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = Path(__file__).resolve().parents[1]
VOCAB = 2048
SECTION = "train-step"


@dataclass
class Job:
    """One model in one worker process."""

    name: str
    kind: str
    """"plait" (through the run config and launcher.loop.train_step) or "llama"."""
    preset: str = ""
    overrides: list[str] = field(default_factory=list)
    """``--set``-style run-config overrides (plait) on top of configs/tiny.yaml."""
    llama: dict = field(default_factory=dict)
    """LlamaConfig fields (llama)."""
    masking: bool = True
    lengths: list[int] = field(default_factory=list)
    steps: int = 3
    limit: float = 120.0
    doc_mean: int = 1024
    vocab: int = VOCAB
    threads: int = 0
    gemm_n: int = 2048
    """Size of the fp32 GEMM the worker times at start (its rate feeds the run's peak)."""
    deadline: float = 0.0
    """Wall-clock time (epoch seconds) by which the run must end; a length predicted to end
    later is not run (0: none)."""


# ---------------------------------------------------------------------------------- worker


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Return freed heap memory to the OS (plait's runtime makes glibc keep it), then reset
    VmHWM to the current RSS (Linux >= 4.0): the peak that follows is this length's."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def document_lengths(T: int, mean: int, seed: int) -> list[int]:
    """Packed documents of one row: exponential lengths (at least 1) filling T tokens."""
    import random

    rng = random.Random(seed * 1_000_003 + T)
    out, left = [], T
    while left:
        n = min(left, max(1, int(rng.expovariate(1.0 / mean))))
        out.append(n)
        left -= n
    return out


def batch(T: int, vocab: int, lengths: list[int], seed: int) -> dict:
    """One packed row: tokens, next-token labels, doc ids and positions (as the loader)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (1, T + 1), generator=g)
    n = torch.tensor(lengths)
    return {
        "tokens": seq[:, :-1],
        "labels": seq[:, 1:],
        "doc_ids": torch.repeat_interleave(torch.arange(len(lengths)), n)[None],
        "positions": torch.cat([torch.arange(int(L)) for L in lengths])[None],
    }


class _Rows:
    """The loader interface train_step reads: the same packed row every step."""

    def __init__(self, b: dict):
        self.b = b

    def next_micro_batch(self) -> dict:
        return self.b


def plait_flops(cfg, vocab: int, lengths: list[int]) -> float:
    """Training FLOPs per token (3 x forward) from plait's cost model
    (plait.models.common.cost: every matmul, each letter's mixing at each document's length)."""
    from plait.models.common import cost

    return cost.training_flops(cfg, vocab, lengths)


def llama_flops(n_params: int, cfg: dict, T: int) -> float:
    """The same formula for the Llama baseline: tied head, causal attention over the row
    (letter A's mixing_flops, 2 d (T + 1) per layer)."""
    d, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    return 3.0 * (2.0 * n_params + layers * 2 * d * (T + 1))


def _measure(step, steps: int, limit: float) -> dict:
    """One warm-up step, then ``steps`` timed ones; RSS growth over the resident set before
    (model, gradients and optimizer state, which a short step at start-up allocated)."""
    _reset_peak()
    base = _rss_kib("VmRSS")
    times, cpu, load = [], [], []

    def timed():
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        load.append(os.getloadavg()[0])
        return loss

    out = {"loss": timed()}
    out["first_s"] = times.pop()
    first_cpu = cpu.pop()
    if out["first_s"] > limit:
        times, cpu = [out["first_s"]], [first_cpu]
        out["status"] = "stopped"
    else:
        for _ in range(steps):
            out["loss"] = timed()
        out["status"] = "ok"
    out.update(times=times, cpu=cpu, load=load, peak_mib=(_rss_kib("VmHWM") - base) / 1024)
    return out


def _plait_model(job: Job):
    """(step(T) -> loss, flops(T, lengths), parameter count) through the run config."""
    from plait.launcher.config import load_config
    from plait.launcher.engine import build_engine
    from plait.launcher.loop import Loop
    from plait.models.common import build_model, param_count
    from plait.parallel import runtime

    sets = [
        f"model.preset={job.preset}",
        "training.micro_batch_size=1",
        "training.precision=fp32",
        "training.steps=1000000",
        "training.eval_every=0",
        "logging.progress_bar=false",
        f"data.document_masking={str(job.masking).lower()}",
        f"data.seq_len={job.lengths[0]}",
    ] + job.overrides
    cfg = load_config(REPO / "configs" / "tiny.yaml", sets)
    cfg.out_dir = os.environ.get("PLAIT_BENCH_OUT", "/tmp/plait-train-step")
    rt = runtime.initialize(
        cfg.parallel, cfg.training.seed, cpu_heap=cfg.training.cpu_heap
    )
    model = build_model(cfg.model, rt.tp, vocab_size=job.vocab)
    engine, _, scheduler = build_engine(model, cfg, rt)

    def step(T: int, rows: _Rows):
        cfg.data.seq_len = T
        s = Loop(cfg, rt, engine, scheduler, rows).step()
        return s.loss

    step.engine = engine  # profile_step.py --phases times its forward, backward and step

    def flops(T, lengths):
        return plait_flops(cfg.model, job.vocab, lengths if job.masking else [T])

    return step, flops, param_count(cfg.model, job.vocab)


def _llama_model(job: Job):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = dict(job.llama)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=job.vocab,
            max_position_embeddings=max(job.lengths),
            tie_word_embeddings=True,
            attn_implementation="sdpa",
            **cfg,
        )
    )
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())

    def step(T: int, rows: _Rows):
        b = rows.b
        loss = model(input_ids=b["tokens"], labels=b["tokens"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def flops(T, lengths):
        return llama_flops(n_params, cfg, T)

    return step, flops, n_params


MIXERS = (("A", "hybrid-25m"), ("M", "moh-25m"), ("W", "based-25m"), ("S", "seqboat-25m"))
"""The letters with softmax attention inside, each at its ~25M preset's shape."""


def _mixer_rows(job: Job) -> None:
    """One layer of each softmax letter, forward + backward of x [1, T, d]: packed documents
    (today's path), no documents, and for A and M the dense [T, T] mask path that packed
    documents took before (kernels/attention's naive form; MoH's _heads with the mask)."""
    import torch
    from megatron.core import ModelParallelConfig

    from plait.kernels.attention import causal_attention
    from plait.models.common import family
    from plait.models.common.layers import apply_rotary, rotary_cos_sin
    from plait.models.presets import get_preset
    from plait.parallel import runtime, softmax
    from plait.parallel.config import ParallelConfig
    from plait.parallel.sequence import SequenceParallel

    runtime.initialize(ParallelConfig(), 0)
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    T = job.lengths[0]
    lengths = document_lengths(T, job.doc_mean, seed=0)
    b = batch(T, job.vocab, lengths, seed=T)
    docs, pos = b["doc_ids"], b["positions"]

    def dense_a(q, k, v, doc_ids=None):
        return causal_attention(q, k, v, doc_ids=doc_ids, backend="naive")

    def dense_moh(m, x):
        q, k, v = m.proj.split(x)
        gates, mask = m._route(x, q, balance=False)
        cos, sin = rotary_cos_sin(pos, q.shape[-1], m.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        idx = torch.arange(T)
        return m.proj.merge(m._heads(q, k, v, gates, mask, idx, idx, docs, docs))

    for symbol, preset in MIXERS:
        cfg = get_preset(preset)
        if symbol == "S":
            cfg.seqboat.router = "on"  # every token active: the attention's full load
        torch.manual_seed(0)
        m = family.letter(symbol).mixer(cfg, mp, 0, SequenceParallel())
        x = torch.randn(1, T, cfg.hidden_size, requires_grad=True)
        paths = {
            "documents": lambda m=m, x=x: m(x, pos, docs),
            "no documents": lambda m=m, x=x: m(x, torch.arange(T)[None]),
        }
        if symbol == "A":
            paths["documents, dense mask (before)"] = "A"
        if symbol == "M":
            paths["documents, dense mask (before)"] = lambda m=m, x=x: dense_moh(m, x)
        for name, fn in paths.items():
            real = softmax.causal_attention
            if fn == "A":
                softmax.causal_attention = dense_a
                fn = paths["documents"]
            try:
                times = []
                for _ in range(job.steps + 1):
                    t0 = time.perf_counter()
                    fn().sum().backward()
                    times.append(time.perf_counter() - t0)
            finally:
                softmax.causal_attention = real
            row = {"letter": symbol, "preset": preset, "path": name, "T": T,
                   "docs": len(lengths), "ms": 1e3 * statistics.median(times[1:]),
                   "all_ms": [1e3 * t for t in times]}
            print("RESULT " + json.dumps(row), flush=True)


def worker(job: Job) -> None:
    """Print one ``RESULT {json}`` line per length (the parent reads them as they come)."""
    import torch

    if job.threads:
        torch.set_num_threads(job.threads)
    print("GEMM " + json.dumps(gemm_rate(job.gemm_n, reps=10)), flush=True)
    if job.kind == "mixers":
        _mixer_rows(job)
        return
    step, flops, n_params = (_plait_model if job.kind == "plait" else _llama_model)(job)
    short = min(128, job.lengths[0])  # allocates gradients and optimizer state before any
    step(short, _Rows(batch(short, job.vocab, document_lengths(short, job.doc_mean, 0), 0)))
    prev = None
    for T in job.lengths:
        lengths = document_lengths(T, job.doc_mean, seed=0)
        f = flops(T, lengths)
        row = {"T": T, "flops_per_token": f, "params": n_params, "docs": len(lengths)}
        if prev is not None:
            predicted = prev[1] * (f * T) / (prev[2] * prev[0])
            late = job.deadline and time.time() + (job.steps + 1) * predicted > job.deadline
            if predicted > job.limit or late:
                row.update(status="predicted" if predicted > job.limit else "budget")
                row["predicted_s"] = predicted
                print("RESULT " + json.dumps(row), flush=True)
                break
        rows = _Rows(batch(T, job.vocab, lengths, seed=T))
        row.update(_measure(lambda T=T, rows=rows: step(T, rows), job.steps, job.limit))
        print("RESULT " + json.dumps(row), flush=True)
        if row["status"] != "ok":
            break
        prev = (T, statistics.median(row["times"]), f)


def gemm_rate(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """(best, median) fp32 GFLOP/s of an n x n x n torch.mm on this process's threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n**3
    return flop / min(times) / 1e9, flop / statistics.median(times) / 1e9


# ---------------------------------------------------------------------------------- parent


def _run_worker(job: Job, timeout: float) -> tuple[list[dict], str, list[float]]:
    """Run one worker; its results so far, an error note ("" when it finished) and the best
    GEMM rate it measured."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(asdict(job))]
    results, note = [], ""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        note = f"worker killed after {timeout:.0f} s"
    gemm = []
    for line in out.splitlines():
        if line.startswith("RESULT "):
            results.append(json.loads(line[7:]))
        elif line.startswith("GEMM "):
            gemm.append(json.loads(line[5:])[0])
    if proc.returncode and not note:
        tail = err.strip().splitlines()[-3:]
        note = f"worker failed (exit {proc.returncode}): " + " | ".join(tail)
    return results, note, gemm


def _llama_shape(d, layers, heads, ffn) -> dict:
    return dict(
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=ffn, rms_norm_eps=1e-5,
    )


LONG = ("transnormer-25m", "based-25m", "gdn-25m", "mamba2-25m")
"""The presets run at the longest length too (the memory claim of issue 15 is about them);
the others stop one length earlier to keep the run within the machine's time."""


def with_sets(job: Job, sets: list[str]) -> Job:
    """``job`` with ``--set`` run-config overrides added when it is a plait model."""
    if job.kind == "plait":
        job.overrides = job.overrides + list(sets)
    return job


def set_flags(sets: list[str]) -> str:
    """The ``--set`` part of a benchmark's command line, as the doc quotes it."""
    return "".join(f" --set {kv}" for kv in sets)


def jobs_25m(lengths, steps, limit, doc_mean) -> list[Job]:
    """In priority order (a run out of time drops the last ones)."""
    common = dict(steps=steps, limit=limit, doc_mean=doc_mean)
    short = [T for T in lengths if T < max(lengths)] or lengths
    out = [Job("Llama (transformers)", "llama", llama=_llama_shape(512, 8, 8, 1280),
               lengths=short, **common)]
    for preset in (
        "transnormer-25m", "based-25m", "hybrid-25m", "h3-25m", "moh-25m", "seqboat-25m",
        "gdn-25m", "mamba2-25m",
    ):
        out.append(Job(preset, "plait", preset, lengths=lengths if preset in LONG else short,
                       **common))
    out.append(Job("plait A x8 (hybrid-25m's shape)", "plait", "hybrid-25m",
                   ["model.pattern=AAAAAAAA"], lengths=short, **common))
    return out


def jobs_tiny(lengths, steps, limit, doc_mean) -> list[Job]:
    common = dict(lengths=lengths, steps=steps, limit=limit, doc_mean=doc_mean)
    out = [Job("Llama (transformers)", "llama", llama=_llama_shape(128, 4, 4, 384), **common)]
    for pattern in ("AAAA", "LALA", "LLLL"):
        for masking in (True, False):
            name = f"plait {pattern}" + ("" if masking else ", no doc masking")
            sets = [f"model.pattern={pattern}"]
            out.append(Job(name, "plait", "hybrid-tiny", sets, masking=masking, **common))
    return out


def jobs_smoke() -> list[Job]:
    common = dict(
        lengths=[64, 128], steps=1, limit=60.0, doc_mean=16, vocab=256, threads=1, gemm_n=256
    )
    tiny = ["model.hidden_size=32", "model.num_heads=2", "model.ffn_hidden_size=64"]
    return [
        Job("Llama (transformers)", "llama", llama=_llama_shape(32, 2, 2, 64), **common),
        Job("plait LALA", "plait", "hybrid-tiny", tiny, **common),
    ]


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def _len(T: int) -> str:
    return f"{T // 1024}K" if T >= 1024 and T % 1024 == 0 else str(T)


def summarise(job: Job, results: list[dict], gemm: float) -> list[dict]:
    rows = []
    for r in results:
        row = {"model": job.name, "masking": job.masking, "T": r["T"], "status": r["status"]}
        row["params"] = r["params"]
        row["flops_per_token"] = r["flops_per_token"]
        row["docs"] = r["docs"]
        if r["status"] in ("predicted", "budget"):
            row["predicted_s"] = r["predicted_s"]
        else:
            step_s = statistics.median(r["times"])
            row.update(step_s=step_s, times=r["times"], peak_mib=r["peak_mib"], loss=r["loss"])
            row["tokens_per_s"] = r["T"] / step_s
            row["tokens_per_cpu_s"] = r["T"] / statistics.median(r["cpu"])
            row["load"] = statistics.median(r["load"])
            row["mfu"] = row["tokens_per_s"] * r["flops_per_token"] / (gemm * 1e9)
        rows.append(row)
    return rows


def _cell(row: dict | None, what: str) -> str:
    if row is None:
        return "-"
    if row["status"] == "predicted":
        return f"not run (~{row['predicted_s']:.0f} s/step predicted)"
    if row["status"] == "budget":
        return "not run (run's time budget)"
    single = "" if row["status"] == "ok" else " (1 step > limit)"
    if what == "tok":
        return _fmt_int(row["tokens_per_s"]) + single
    if what == "cpu":
        return _fmt_int(row["tokens_per_cpu_s"]) + single
    if what == "load":
        return f"{row['load']:.1f}"
    if what == "mem":
        return f"{row['peak_mib']:,.0f}"
    return f"{100 * row['mfu']:.1f}%"


def table(rows: list[dict], what: str, models: list[str], lengths: list[int]) -> str:
    out = ["| model | " + " | ".join(_len(T) for T in lengths) + " |"]
    out.append("|---" * (len(lengths) + 1) + "|")
    for m in models:
        cells = []
        for T in lengths:
            match = [r for r in rows if r["model"] == m and r["T"] == T]
            cells.append(_cell(match[0] if match else None, what))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def ratios(rows, base: str, models: list[str], lengths: list[int], key="tokens_per_s") -> str:
    out = ["| model vs " + base + " | " + " | ".join(_len(T) for T in lengths) + " |"]
    out.append("|---" * (len(lengths) + 1) + "|")
    for m in models:
        cells = []
        for T in lengths:
            a = [r for r in rows if r["model"] == m and r["T"] == T and key in r]
            b = [r for r in rows if r["model"] == base and r["T"] == T and key in r]
            cells.append(f"{a[0][key] / b[0][key]:.2f}x" if a and b else "-")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def issue_table(rows: list[dict], lengths: list[int], ratio: bool, key="tokens_per_s") -> str:
    """The issue's layout: a row per (length, masking), a column per model; tokens/s, or the
    ratio to the Llama baseline of the same length."""
    base = "Llama (transformers)"
    what = "tok" if key == "tokens_per_s" else "cpu"
    cols = ["AAAA", "LALA", "LLLL"]
    head = "| seq | Llama baseline | " + " | ".join(f"plait {c}" for c in cols) + " |"
    out = [head, "|---" * (len(cols) + 2) + "|"]

    def get(model, T):
        m = [r for r in rows if r["model"] == model and r["T"] == T]
        return m[0] if m else None

    for T in lengths:
        llama = get(base, T)
        for masking, label in ((True, "documents masked (default)"),
                               (False, "`data.document_masking=false`")):
            cells = [_cell(llama, what) if not ratio else "1.00x" if llama else "-"]
            for c in cols:
                r = get(f"plait {c}" + ("" if masking else ", no doc masking"), T)
                if not ratio or r is None or key not in r:
                    cells.append(_cell(r, what) if not ratio else "-")
                elif llama is None or key not in llama:
                    cells.append("-")
                else:
                    cells.append(f"{r[key] / llama[key]:.2f}x")
            out.append(f"| {_len(T)}, {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def memory_slope(rows: list[dict], model: str, lo: int, hi: int) -> float | None:
    """Log-log slope of peak RSS growth between lengths lo and hi."""
    a = [r for r in rows if r["model"] == model and r["T"] == lo and "peak_mib" in r]
    b = [r for r in rows if r["model"] == model and r["T"] == hi and "peak_mib" in r]
    if hi <= lo or not a or not b or a[0]["peak_mib"] <= 0:
        return None
    return math.log(b[0]["peak_mib"] / a[0]["peak_mib"]) / math.log(hi / lo)


def plot(rows: list[dict], models: list[str], path_prefix: Path, title: str) -> list[Path]:
    """tokens/s and peak memory against sequence length, one line per model (log-log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for key, label, suffix in (
        ("tokens_per_s", "tokens / s", "tokens"),
        ("peak_mib", "peak RSS growth (MiB)", "memory"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in models:
            pts = [(r["T"], r[key]) for r in rows if r["model"] == m and key in r]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(f"{path_prefix}_{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _gemm_subprocess(threads: int) -> tuple[float, float]:
    code = (
        "import sys, json, torch; sys.path.insert(0, sys.argv[1]);"
        f"torch.set_num_threads({threads}) if {threads} else None;"
        "from train_step import gemm_rate; print(json.dumps(gemm_rate()))"
    )
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run(
        [sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__))],
        capture_output=True, text=True, env=env, check=True,
    )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; no docs edit")
    ap.add_argument("--out", default="", help="directory for table.md / results.json / PNGs")
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    ap.add_argument("--tiny-lengths", default="8192,16384")
    ap.add_argument("--mixer-length", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per length (median)")
    ap.add_argument("--limit", type=float, default=120.0, help="seconds one step may take")
    ap.add_argument("--doc-mean", type=int, default=1024, help="mean document length")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    ap.add_argument("--budget", type=float, default=55.0, help="minutes for the whole run")
    ap.add_argument(
        "--only", default="",
        help="comma-separated model names to run, optionally as group:name (mixers, tiny, 25m)",
    )
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a run-config override for every plait model (e.g. training.cpu_heap=keep)",
    )
    ap.add_argument(
        "--merge", action="store_true",
        help="keep the other models' rows of the last full run (docs/train_step_results.json)",
    )
    ap.add_argument(
        "--render", action="store_true",
        help="rewrite the docs section from docs/train_step_results.json; run nothing",
    )
    args = ap.parse_args(argv)
    if args.worker:
        worker(Job(**json.loads(args.worker)))
        return 0
    if args.render:
        return render(json.loads((REPO / "docs" / "train_step_results.json").read_text()),
                      REPO / "docs", write_doc=True)

    t_start = time.time()
    threads = 1 if args.smoke else 0
    g0 = _gemm_subprocess(threads)
    if args.smoke:
        groups = [("smoke", jobs_smoke())]
    else:
        L = [int(x) for x in args.lengths.split(",")]
        tl = [int(x) for x in args.tiny_lengths.split(",")]
        mixers = Job("mixers", "mixers", lengths=[args.mixer_length], steps=args.steps,
                     doc_mean=args.doc_mean)
        groups = [
            ("mixers", [mixers]),
            ("tiny", jobs_tiny(tl, args.steps, args.limit, args.doc_mean)),
            ("25m", jobs_25m(L, args.steps, args.limit, args.doc_mean)),
        ]
    deadline = t_start + 60 * args.budget
    only = set(filter(None, args.only.split(",")))
    raw: dict[str, list[tuple[Job, list[dict], str]]] = {}
    worker_gemm: list[float] = []
    for gname, jobs in groups:
        raw[gname] = []
        for job in jobs:
            if only and job.name not in only and f"{gname}:{job.name}" not in only:
                continue
            job.deadline = 0.0 if args.smoke else deadline
            with_sets(job, args.set)
            if job.deadline and time.time() > job.deadline:
                raw[gname].append((job, [], "not run: the run's time budget was spent"))
                continue
            t0 = time.time()
            results, note, gemm_rates = _run_worker(job, args.timeout)
            worker_gemm += gemm_rates
            raw[gname].append((job, results, note))
            print(f"[{gname}] {job.name} (masking={job.masking}): {len(results)} lengths in "
                  f"{time.time() - t0:.0f} s {note}", flush=True)
    g1 = _gemm_subprocess(threads)
    gemm = max([g0[0], g1[0]] + worker_gemm)
    out_dir = Path(args.out) if args.out else REPO / "docs"
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "gemm_gflops": {"before": g0, "after": g1, "workers": worker_gemm, "peak": gemm},
        "groups": {},
    }
    notes: dict[str, list[str]] = {}
    for gname, entries in raw.items():
        if gname == "mixers":
            summary["groups"][gname] = [r for _, res, _ in entries for r in res]
        else:
            summary["groups"][gname] = [
                r for job, res, _ in entries for r in summarise(job, res, gemm)
            ]
        notes[gname] = [f"- {job.name}: {note}" for job, _, note in entries if note]
    results_path = out_dir / ("train_step_results.json" if not args.out else "results.json")
    header = _header(args, gemm, g0, g1, t_start, len(worker_gemm))
    summary["header"] = header
    if args.merge:
        summary, header = _merge(json.loads(results_path.read_text()), summary, header, args)
        summary["header"] = header
    summary["notes"] = {g: summary.get("notes", {}).get(g, []) + notes.get(g, [])
                        for g in summary["groups"]}
    results_path.write_text(json.dumps(summary, indent=1))
    return render(summary, out_dir, write_doc=not args.out)


def render(summary: dict, out_dir: Path, write_doc: bool) -> int:
    """The section's text from a results summary (MFU against its peak), written to
    docs/benchmarks.md or, with ``write_doc`` False, to out_dir/table.md."""
    peak = summary["gemm_gflops"]["peak"]
    for rows in summary["groups"].values():  # MFU against the run's (or merged runs') peak
        for r in rows:
            if "tokens_per_s" in r:
                r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e9)
    body = [summary["header"]]
    for gname, rows in summary["groups"].items():
        if not rows:
            continue
        if gname == "mixers":
            body.append(_mixers_text(rows, summary["notes"][gname]))
        else:
            body.append(_group_text(gname, rows, summary["notes"][gname], out_dir))
    if "25m" in summary["groups"] or "tiny" in summary["groups"]:
        body.append(targets_text(summary["groups"], peak))
    text = "\n\n".join(body)
    if write_doc:
        from common import write_section

        write_section(SECTION, text)
    else:
        (out_dir / "table.md").write_text(text + "\n")
    print(text)
    return 0


TARGETS = (
    ("tiny", "plait LALA", 16384, 2.0),
    ("tiny", "plait AAAA", 8192, 1 / 1.1),
    ("25m", "transnormer-25m", 8192, 2.0),
    ("25m", "transnormer-25m", 16384, 6.0),
    ("25m", "based-25m", 8192, 2.0),
    ("25m", "based-25m", 16384, 6.0),
)
"""(group, model, tokens, the issue's least tokens/s ratio to the Llama baseline)."""


def targets_text(groups: dict, peak: float) -> str:
    """The issue's speed targets against the same run's Llama rows, each with its ceiling on
    this machine: the ratio the model would reach at 100% MFU (its FLOPs per token at the
    measured GEMM peak) over the baseline's measured rate."""
    out = [
        "### The targets, and what this CPU allows",
        "",
        "| model | tokens | target (x Llama) | measured | ceiling at 100% MFU | met |",
        "|---|---|---|---|---|---|",
    ]
    for gname, model, T, target in TARGETS:
        rows = groups.get(gname, [])

        def get(name, rows=rows, T=T):
            m = [r for r in rows if r.get("model") == name and r.get("T") == T]
            return m[0] if m and m[0].get("status") == "ok" else None

        base, row = get("Llama (transformers)"), get(model)
        if base is None or row is None:
            out.append(f"| {model} | {_len(T)} | {target:.2f}x | not measured | - | - |")
            continue
        ratio = row["tokens_per_s"] / base["tokens_per_s"]
        ceiling = peak * 1e9 / row["flops_per_token"] / base["tokens_per_s"]
        met = "yes" if ratio >= target else ("no; above the ceiling" if target > ceiling else "no")
        out.append(f"| {model} | {_len(T)} | {target:.2f}x | {ratio:.2f}x | {ceiling:.2f}x "
                   f"| {met} |")
    out += [
        "",
        "The ceiling divides the measured fp32 GEMM peak by the model's FLOPs per token and by "
        "the baseline's tokens/s: a target above it needs the baseline itself to run below "
        "its measured MFU, whatever plait does (the Llama baseline's SDPA is the flash kernel, "
        "its FLOPs are GEMMs).",
    ]
    return "\n".join(out)


def _doc_header() -> str:
    """The header paragraph of the section already in docs/benchmarks.md (runs saved
    before the results file kept it)."""
    from common import DOC

    text = DOC.read_text() if DOC.exists() else ""
    begin = text.find(f"<!-- {SECTION}:begin -->")
    if begin < 0:
        return ""
    body = text[begin:].split("\n", 1)[1]
    return body.split("\n\n### ", 1)[0].strip()


def _merge(prev: dict, now: dict, header: str, args) -> tuple[dict, str]:
    """The last run's rows with this run's models replaced (or added), and a header that
    keeps the last run's and says what this one added."""
    ran_now = {r.get("model", r.get("letter")) for g in now["groups"].values() for r in g}
    out = {"gemm_gflops": dict(prev["gemm_gflops"]), "groups": {}, "notes": {}}
    for gname, lines in prev.get("notes", {}).items():  # drop the re-run models' old notes
        out["notes"][gname] = [
            n for n in lines if not any(n.startswith(f"- {m}:") for m in ran_now)
        ]
    for gname in list(prev["groups"]) + [g for g in now["groups"] if g not in prev["groups"]]:
        old, new = prev["groups"].get(gname, []), now["groups"].get(gname, [])
        key = "letter" if gname == "mixers" else "model"
        ran = {r[key] for r in new}
        merged = [r for r in old if r[key] not in ran] + new
        out["groups"][gname] = merged
    out["gemm_gflops"]["merged"] = now["gemm_gflops"]
    out["gemm_gflops"]["peak"] = max(prev["gemm_gflops"]["peak"], now["gemm_gflops"]["peak"])
    old_header = prev.get("header", "") or _doc_header()
    added = sorted({r.get("model", r.get("letter")) for g in now["groups"].values() for r in g})
    header = (old_header or header) + (
        f"\n\nRows of {', '.join(added)} come from a later invocation "
        f"(`python benchmarks/train_step.py --merge --only ...`), whose best fp32 GEMM was "
        f"{now['gemm_gflops']['peak']:.0f} GFLOP/s; every MFU below is against the best of "
        f"both invocations, {out['gemm_gflops']['peak']:.0f} GFLOP/s. Their ratios to the "
        "Llama baseline cross the two invocations."
    )
    out["header"] = header
    return out, header


def _header(args, gemm, g0, g1, t_start, n_workers: int = 0) -> str:
    from common import machine

    cmd = "python benchmarks/train_step.py" + (" --smoke" if args.smoke else "")
    cmd += set_flags(args.set)
    return (
        "## Training step, CPU: plait's families against transformers' Llama\n\n"
        f"`{cmd}` (benchmarks/train_step.py says what is measured and how); {machine()}; "
        f"fp32, micro-batch 1, one process, packed rows of documents with exponential lengths "
        f"(mean {args.doc_mean} tokens, the same for every model); medians of {args.steps} "
        f"timed steps after one warm-up step per length; a step longer than {args.limit:.0f} s "
        "stops the model. Tokens per CPU-second divide by the process's CPU time (user + "
        "system, all threads): other work on the cores barely moves it, but it credits a "
        "model for serial stretches where the second core idles. fp32 GEMM (n = 2048): "
        f"{g0[0]:.0f} GFLOP/s before the models, {g1[0]:.0f} after (best of 5; medians "
        f"{g0[1]:.0f}, {g1[1]:.0f}), and best of 10 at the start of each of the {n_workers} "
        f"workers; MFU is against the best of all, {gemm:.0f}. The machine's 2 cores were "
        "shared with other work during the run (load averages below), so wall-clock rates "
        "are noisy; the ratios come from the same run. Wall time of the run: "
        f"{(time.time() - t_start) / 60:.0f} min."
    )


def _mixers_text(rows: list[dict], notes: list[str]) -> str:
    paths = ["documents", "no documents", "documents, dense mask (before)"]
    T = rows[0]["T"] if rows else 0
    docs = rows[0]["docs"] if rows else 0
    out = [
        "### Softmax letters over packed documents: one layer, forward + backward",
        "",
        f"x [1, {T}, d] at each letter's ~25M preset shape, {docs} documents in the row "
        "(S with every token routed to its attention); milliseconds, median of the timed "
        'steps. "dense mask (before)" is the path packed documents took before this change '
        "(a [T, T] boolean mask: SDPA's math path on CPU).",
        "",
        "| letter (preset) | " + " | ".join(paths) + " |",
        "|---" * (len(paths) + 1) + "|",
    ]
    for letter, preset in MIXERS:
        cells = []
        for p in paths:
            m = [r for r in rows if r["letter"] == letter and r["path"] == p]
            cells.append(f"{m[0]['ms']:,.0f}" if m else "-")
        out.append(f"| {letter} ({preset}) | " + " | ".join(cells) + " |")
    out += notes
    return "\n".join(out)


def _group_text(gname, rows, notes: list[str], out_dir: Path) -> str:
    models = []
    for r in rows:
        if r["model"] not in models:
            models.append(r["model"])
    lengths = sorted({r["T"] for r in rows})
    params = {r["model"]: r["params"] for r in rows}
    title = {
        "25m": "### ~25M parameters (vocabulary 2048)",
        "tiny": "### configs/tiny.yaml sizes (4 layers, d 128, vocabulary 2048): the issue's table",
        "smoke": "### Smoke (tiny shapes; timings meaningless)",
    }[gname]
    parts = [title, ""]
    parts.append(
        "Parameters: " + ", ".join(f"{m} {params[m] / 1e6:.1f}M" for m in models if m in params)
    )
    cpu_key = "tokens_per_cpu_s"
    if gname == "tiny":
        parts += ["", "tokens/s:", "", issue_table(rows, lengths, ratio=False), ""]
        parts += ["Against the Llama baseline (same run):", ""]
        parts += [issue_table(rows, lengths, ratio=True), ""]
        parts += ["Tokens per CPU-second, against the Llama baseline:", ""]
        parts += [issue_table(rows, lengths, ratio=True, key=cpu_key), ""]
        parts += ["1-minute load average during the steps:", ""]
        parts += [table(rows, "load", models, lengths)]
    else:
        parts += ["", "tokens/s:", "", table(rows, "tok", models, lengths), ""]
        named = [m for m in models if m != "Llama (transformers)"]
        parts += ["Against the Llama baseline (tokens/s ratio, same run):", ""]
        parts += [ratios(rows, "Llama (transformers)", named, lengths), ""]
        parts += ["Tokens per CPU-second:", "", table(rows, "cpu", models, lengths), ""]
        parts += ["Against the Llama baseline (tokens per CPU-second):", ""]
        parts += [ratios(rows, "Llama (transformers)", named, lengths, cpu_key), ""]
        parts += ["1-minute load average during the steps:", ""]
        parts += [table(rows, "load", models, lengths), ""]
        parts += ["Peak memory, RSS growth during the step (MiB):", ""]
        parts += [table(rows, "mem", models, lengths), ""]
        parts += ["MFU (model FLOPs over the measured fp32 GEMM peak):", ""]
        parts += [table(rows, "mfu", models, lengths), ""]
        fl = {}
        for r in rows:
            fl.setdefault(r["model"], {})[r["T"]] = r["flops_per_token"]
        parts += ["Model FLOPs per token (training, 3 x forward; MFLOP):", ""]
        parts += [
            "| model | " + " | ".join(_len(T) for T in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for m in models:
            cells = [f"{fl[m][T] / 1e6:,.1f}" if T in fl.get(m, {}) else "-" for T in lengths]
            parts.append(f"| {m} | " + " | ".join(cells) + " |")
        slopes = []
        lo, hi = (4096, 32768) if 32768 in lengths else (lengths[0], lengths[-1])
        for m in models:
            s = memory_slope(rows, m, lo, hi)
            if s is None and hi == 32768:
                s16 = memory_slope(rows, m, lo, 16384)
                slopes.append(f"{m} " + (f"{s16:.2f} (4K-16K)" if s16 is not None else "-"))
            else:
                slopes.append(f"{m} " + (f"{s:.2f}" if s is not None else "-"))
        parts += ["", f"Log-log slope of peak memory, {_len(lo)}-{_len(hi)}: "
                  + "; ".join(slopes) + "."]
        pngs = plot(rows, models, out_dir / f"train_step_{gname}", title.lstrip("# "))
        if pngs:
            parts += ["", " ".join(f"![{p.stem}]({p.name})" for p in pngs)]
    if notes:
        parts += ["", "Notes:", *notes]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
