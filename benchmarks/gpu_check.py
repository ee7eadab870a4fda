"""GPU readiness check: one prepared script for one H100/H200, finishing within 8 minutes.

The CUDA path has never run on a GPU (issues 15 and 18): the Triton kernels are checked under
the CPU interpreter and compiled ahead of time, nothing more. When a GPU machine is lent, this
is the one command to run, so that its few minutes measure everything at once:

    .venv/bin/python benchmarks/gpu_check.py --out runs/gpu_check --write-doc   # 1 GPU, < 8 min
    .venv/bin/python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check       # CPU (CI), < 60 s

Sections, in order of what matters most if the budget runs out (each reports ok / FAILED /
skipped with the reason, never silently nothing):
1. kernels: every Triton kernel (lightning with documents and initial state, with per-token
   decays, its state kernels' sequential and chunk-parallel forms at batch 1, the LASP-2 chunk
   state, sliding window, short convolution, the gated delta scan) against its plain
   reference computed in float64
   from the same (rounded) inputs: outputs and gradients, fp32 and bf16, T not a multiple of
   the block. Relative Frobenius error against a stated tolerance (``TOLERANCE``).
2. attention: the Triton lightning kernel against flash-linear-attention's chunk kernel
   (``fla``, if importable; skipped and said otherwise) and causal SDPA (flash attention on
   CUDA) at 8K and 32K tokens, forward + backward, bf16.
3. train: configs/tiny.yaml trained 50 steps through plait's launcher
   (``python -m plait.launcher.train``; one process: the runtime picks nccl on CUDA) in bf16;
   the loss must fall (mean of the last 5 steps below the first 5).
4. families: one training step (DeepSpeed engine, LAMB, as the launcher builds it) of each
   family's 1B-class preset at 8K tokens in bf16, in a fresh process each: step time, peak
   memory and MFU against the device's dense bf16 peak (``PEAK_BF16_TFLOPS``, by device name)
   and against a bf16 GEMM measured in the same run.

``--smoke`` runs the same code on CPU so that CI notices when it rots: TRITON_INTERPRET=1,
tiny shapes, the launcher on gloo in fp32 for 3 steps, one tiny preset for the family step;
bf16 timing, flash attention and fla need CUDA and are skipped with that reason.
The report opens with one table of every check (section, case, status, figure), printed at
the end of the run. Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``
(``--write-doc``: also the gpu-check section of docs/benchmarks.md); exit status 1 if a
check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets. Matched
# against torch.cuda.get_device_name() in this order (NVL and PCIe before the SXM default).
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
)

# Relative Frobenius error ||x - ref|| / ||ref|| against a float64 reference fed the same
# (already rounded) inputs, so only the kernel's own arithmetic counts:
#  * fp32 on CUDA: tf32x3 dots (about fp32) with float32 accumulation over up to 1K tokens;
#  * fp32 under the interpreter: IEEE fp32 throughout;
#  * bf16: operands of every dot rounded to bf16 (probabilities, states cast to the input
#    dtype, as flash attention does) and the outputs stored in bf16 (2^-8 alone).
TOLERANCE = {("cuda", "fp32"): 1e-3, ("cpu", "fp32"): 1e-5, ("cuda", "bf16"): 3e-2,
             ("cpu", "bf16"): 3e-2}

DTYPES = ("fp32", "bf16")


# ------------------------------------------------------------------------------ helpers
def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are zero)."""
    x, ref = x.double(), ref.double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def doc_ids(B: int, T: int, mean: int, seed: int, device):
    """Packed documents with random (geometric) lengths of about ``mean`` tokens, ids
    non-decreasing along each row as the loader makes them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 1.0 / mean
    starts[:, 0] = False
    return (starts.long().cumsum(1) + 1000 * torch.arange(B)[:, None]).to(device)


def peak_tflops(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of ``reps`` calls after one warm-up call (which compiles/autotunes)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_tflops(device: str, dtype_name: str, n: int, reps: int) -> float:
    """Best TFLOP/s of an n x n x n matmul: the attainable rate the MFU is also quoted against."""
    import torch

    dt = _torch_dtype(dtype_name)
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    torch.mm(a, b)
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e12


class Budget:
    """Wall-clock budget of the whole check; sections ask before starting costly work."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------ 1. kernels
def _grad_check(run, ref, inputs: dict, device: str, seed: int) -> dict:
    """Run ``run`` (the Triton path) and ``ref`` on the same inputs (the reference in float64),
    backpropagate the same random cotangents through both; relative errors of every output
    and every input gradient."""
    import torch

    leaves = [k for k, v in inputs.items() if v.is_floating_point()]
    x_run = {k: v.detach().clone().requires_grad_(k in leaves) for k, v in inputs.items()}
    x_ref = {k: v.detach().double().requires_grad_() if k in leaves else v
             for k, v in inputs.items()}
    outs, ref_outs = run(x_run), ref(x_ref)
    g = torch.Generator(device=device).manual_seed(seed + 7)
    cot = [torch.randn(o.shape, generator=g, device=device, dtype=torch.float64) for _, o in outs]
    errs = {name: rel_err(o, r) for (name, o), (_, r) in zip(outs, ref_outs, strict=True)}
    sum((o.double() * c).sum() for (_, o), c in zip(outs, cot, strict=True)).backward()
    sum((r * c).sum() for (_, r), c in zip(ref_outs, cot, strict=True)).backward()
    for k in leaves:
        errs[f"d{k}"] = rel_err(x_run[k].grad, x_ref[k].grad)
    return errs


def kernel_cases(device: str, smoke: bool) -> list[dict]:
    """(kernel, shape, dtype, variant) to check; T is never a multiple of the block."""
    if smoke:
        lt = [dict(B=1, H=2, T=40, D=20, E=12, docs=True, init=True),
              dict(B=1, H=2, T=40, D=20, E=12, docs=True, init=True, g=True),
              dict(B=1, H=2, T=70, D=20, E=12, docs=True, init=True, form="parallel")]
        sw = [dict(B=1, H=2, T=40, D=16, window=7, docs=True)]
        sc = [dict(B=1, T=40, C=24, K=3, docs=True)]
        cs = [dict(B=1, H=2, T=40, D=20, E=12, docs=True),
              dict(B=1, H=2, T=40, D=20, E=12, docs=True, g=True)]
        gd = [dict(B=1, H=2, T=40, K=20, V=12, docs=True, init=True)]
    else:
        lt = [
            dict(B=2, H=4, T=1000, D=64, E=64, docs=False, init=False),
            dict(B=2, H=4, T=1000, D=128, E=128, docs=True, init=True),
            dict(B=1, H=4, T=1000, D=153, E=65, docs=True, init=False),  # Based's features
            # Mamba-2 (Bamba's heads: state 128 x 64 channels, per-token decays dt A)
            dict(B=2, H=4, T=1000, D=128, E=64, docs=True, init=True, g=True),
            # the state kernels' two forms at batch 1, forced (the wrapper picks by the grid)
            dict(B=1, H=4, T=1000, D=128, E=128, docs=True, init=True, form="sequential"),
            dict(B=1, H=4, T=1000, D=128, E=128, docs=True, init=True, form="parallel"),
            dict(B=1, H=4, T=1000, D=128, E=64, docs=True, init=True, g=True, form="parallel"),
        ]
        sw = [
            dict(B=2, H=4, T=1000, D=64, window=256, docs=True),
            dict(B=2, H=4, T=1000, D=128, window=100, docs=False),
        ]
        sc = [dict(B=2, T=1000, C=512, K=3, docs=True), dict(B=2, T=1000, C=512, K=4, docs=False)]
        cs = [dict(B=2, H=4, T=1000, D=128, E=128, docs=True), dict(B=1, H=4, T=1000, D=153, E=65,
              docs=True), dict(B=2, H=4, T=1000, D=128, E=64, docs=True, g=True)]
        gd = [dict(B=2, H=4, T=1000, K=128, V=128, docs=True, init=True),  # Qwen3.5's heads
              dict(B=1, H=4, T=1000, K=64, V=64, docs=False, init=False)]
    out = []
    for dt in DTYPES:
        out += [dict(kernel="lightning", dtype=dt, **c) for c in lt]
        out += [dict(kernel="lasp2 chunk state", dtype=dt, **c) for c in cs]
        out += [dict(kernel="swa", dtype=dt, **c) for c in sw]
        out += [dict(kernel="shortconv", dtype=dt, **c) for c in sc]
        out += [dict(kernel="gated delta", dtype=dt, **c) for c in gd]
    return out


def check_kernel(case: dict, device: str, seed: int = 0) -> dict:
    import torch

    from plait.kernels.gated_delta import gated_delta_rule, l2_normalize
    from plait.kernels.lightning import lightning_attention, lightning_chunk_state
    from plait.kernels.shortconv import short_conv
    from plait.kernels.swa import swa
    from plait.parallel.lasp2 import chunk_state

    torch.manual_seed(seed)
    dt = _torch_dtype(case["dtype"])
    kind = case["kernel"]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dt)

    docs = doc_ids(case["B"], case["T"], 200 if case["T"] > 100 else 12, seed, device) if (
        case.get("docs")) else None
    if kind in ("lightning", "lasp2 chunk state"):
        B, H, T, D, E = (case[k] for k in "BHTDE")
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device)
        inputs = dict(k=rnd(B, H, T, D, scale=D**-0.5), v=rnd(B, H, T, E))
        if case.get("g"):  # per-token log-decays (Mamba-2's dt A), float32 as the mixer makes
            inputs["g"] = -torch.rand(B, H, T, device=device) * 0.5
        if kind == "lightning":
            inputs["q"] = rnd(B, H, T, D, scale=D**-0.5)
            if case["init"]:
                inputs["init"] = torch.randn(B, H, D, E, device=device) * 0.1

            def call(x, backend):
                o, s = lightning_attention(
                    x["q"], x["k"], x["v"], slopes, doc_ids=docs, initial_state=x.get("init"),
                    return_state=True, backend=backend, g=x.get("g"),
                )
                return [("o", o), ("state", s)]

            def run(x):
                return call(x, "triton")

            def ref(x):
                return call(x, "naive")
        else:

            def run(x):
                # LASP-2's own dispatch (auto picks this kernel on CUDA; forced for the CPU smoke)
                return [("state", chunk_state(x["k"], x["v"], slopes, docs, backend="triton",
                                              g=x.get("g")))]

            def ref(x):
                return [("state", lightning_chunk_state(x["k"], x["v"], slopes.double(), docs,
                                                        g=x.get("g")))]
    elif kind == "gated delta":
        B, H, T, K, V = (case[k] for k in "BHTKV")
        qk = [l2_normalize(rnd(B, H, T, K)).to(dt) for _ in range(2)]
        inputs = dict(q=qk[0], k=qk[1], v=rnd(B, H, T, V),
                      g=(-0.3 * torch.rand(B, H, T, device=device)).to(dt),
                      beta=torch.rand(B, H, T, device=device).to(dt))
        if case["init"]:
            inputs["init"] = torch.randn(B, H, K, V, device=device) * 0.1

        def gd_call(x, backend):
            o, s = gated_delta_rule(x["q"], x["k"], x["v"], x["g"], x["beta"], doc_ids=docs,
                                    initial_state=x.get("init"), return_state=True,
                                    backend=backend)
            return [("o", o), ("state", s)]

        def run(x):
            return gd_call(x, "triton")  # the chunk path with its scan as Triton kernels

        def ref(x):
            return gd_call(x, "naive")
    elif kind == "swa":
        B, H, T, D = (case[k] for k in "BHTD")
        inputs = dict(q=rnd(B, H, T, D), k=rnd(B, H, T, D), v=rnd(B, H, T, D))

        def run(x):
            o = swa(x["q"], x["k"], x["v"], case["window"], doc_ids=docs, backend="triton")
            return [("o", o)]

        def ref(x):
            return [("o", swa(x["q"], x["k"], x["v"], case["window"], doc_ids=docs,
                              backend="naive"))]
    else:
        B, T, C, K = (case[k] for k in "BTCK")
        inputs = dict(x=rnd(B, T, C), w=rnd(C, K, scale=K**-0.5), bias=rnd(C))

        def run(x):
            return [("y", short_conv(x["x"], x["w"], x["bias"], doc_ids=docs, backend="triton"))]

        def ref(x):
            return [("y", short_conv(x["x"], x["w"], x["bias"], doc_ids=docs, backend="naive"))]

    t0 = time.perf_counter()
    form = os.environ.get("PLAIT_LIGHTNING_STATE_FORM")
    if case.get("form"):  # kernels/lightning/triton.py state_form reads it at every call
        os.environ["PLAIT_LIGHTNING_STATE_FORM"] = case["form"]
    try:
        errs = _grad_check(run, ref, inputs, device, seed)
    finally:
        if form is None:
            os.environ.pop("PLAIT_LIGHTNING_STATE_FORM", None)
        else:
            os.environ["PLAIT_LIGHTNING_STATE_FORM"] = form
    tol = TOLERANCE[(device, case["dtype"])]
    worst = max(errs.values())
    return dict(case, errors=errs, worst=worst, tolerance=tol, ok=bool(worst <= tol),
                seconds=round(time.perf_counter() - t0, 2))


def section_kernels(args, budget: Budget, device: str) -> dict:
    rows, skipped = [], []
    seeds = (0,) if not args.smoke else (0, 1)
    for case in kernel_cases(device, args.smoke):
        for seed in seeds:
            if budget.left() < args.reserve:
                skipped.append(dict(case, reason="time budget"))
                continue
            try:
                rows.append(dict(check_kernel(case, device, seed), seed=seed))
            except Exception as e:  # a kernel that does not run is a result too
                rows.append(dict(case, seed=seed, ok=False, error=_err(e)))
    ok = all(r["ok"] for r in rows)
    return dict(status="ok" if ok else "FAILED", rows=rows, skipped=skipped)


def _err(e: BaseException) -> str:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return ("".join(tb[-3:]))[-1500:]


# ------------------------------------------------------------------------------ 2. attention
def _fla_call():
    """flash-linear-attention's chunk kernel for decayed linear attention (simple GLA with a
    per-head constant decay is lightning attention), or the reason it cannot run."""
    try:
        import inspect

        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as e:
        return None, f"fla not importable ({type(e).__name__}: {e})"
    params = inspect.signature(chunk_simple_gla).parameters

    def call(q, k, v, slopes):  # ours: [B, H, T, D]; fla: [B, T, H, D]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        B, T, H, _ = q.shape
        if "g_gamma" in params:
            o = chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0)
        else:
            g = (-slopes).view(1, 1, H).expand(B, T, H).contiguous()
            o = chunk_simple_gla(q, k, v, g=g, scale=1.0)
        o = o[0] if isinstance(o, tuple) else o
        return o.transpose(1, 2)

    return call, ""


def section_attention(args, budget: Budget, device: str) -> dict:
    """In a fresh process with autotuning on (the comparison is about speed), bounded by what
    is left of the budget."""
    env = {k: v for k, v in os.environ.items() if k != "PLAIT_TRITON_AUTOTUNE"}
    spec = dict(smoke=args.smoke, device=device, seconds=budget.left(), reserve=args.reserve)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--attention-worker", json.dumps(spec)]
    left = budget.left() - args.reserve
    timeout = args.attention_timeout if args.smoke else max(5.0, min(args.attention_timeout, left))
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="FAILED", rows=[], error=f"killed after {timeout:.0f} s")
    res = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not res:
        return dict(status="FAILED", rows=[], error=f"exit {p.returncode}: {p.stderr[-1500:]}")
    return res[0]


def attention_worker(spec: dict) -> None:
    class _Args:
        smoke, reserve = spec["smoke"], spec["reserve"]

    res = attention_rows(_Args, Budget(spec["seconds"]), spec["device"])
    print("RESULT " + json.dumps(res), flush=True)


def attention_rows(args, budget: Budget, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from plait.kernels.lightning import lightning_attention

    if args.smoke:
        lengths, B, H, D, dtn, reps = (64, 128), 1, 2, 16, "fp32", 1
    else:
        lengths, B, H, D, dtn, reps = (8192, 32768), 1, 16, 128, "bf16", 5
    dt = _torch_dtype(dtn)
    fla, fla_reason = _fla_call()
    if device != "cuda":
        fla, fla_reason = None, "fla's kernels need CUDA (they do not run under the interpreter)"
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device)
    if device == "cuda":  # flash attention itself, not whatever SDPA would pick
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_backend = "flash attention (SDPBackend.FLASH_ATTENTION)"

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        sdpa_backend = "torch's CPU choice"

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    rows = []
    for T in lengths:
        if budget.left() < args.reserve:
            rows.append(dict(T=T, skipped="time budget"))
            continue
        torch.manual_seed(T)
        q, k = (torch.randn(B, H, T, D, device=device, dtype=dt) * D**-0.5 for _ in range(2))
        v = torch.randn(B, H, T, D, device=device, dtype=dt)
        do = torch.randn_like(v)
        xs = [x.requires_grad_() for x in (q, k, v)]

        def fwd_bwd(f, xs=xs, do=do):
            def go():
                for x in xs:
                    x.grad = None
                f(*xs).backward(do)

            return go

        row = dict(T=T, B=B, H=H, D=D, dtype=dtn)
        impls = {
            "triton lightning": lambda q, k, v: lightning_attention(q, k, v, slopes,
                                                                    backend="triton"),
            "sdpa causal": lambda q, k, v: sdpa(q, k, v),
        }
        if fla is not None:
            impls["fla chunk_simple_gla"] = lambda q, k, v: fla(q, k, v, slopes)
        else:
            row["fla"] = f"skipped: {fla_reason}"
        for name, f in impls.items():
            try:
                row[f"{name} ms"] = round(1e3 * timed(fwd_bwd(f), device, reps), 3)
            except Exception as e:
                row[f"{name} ms"] = None
                row[f"{name} error"] = _err(e)
        row["sdpa backend"] = sdpa_backend
        if fla is not None and T == lengths[0]:
            with torch.no_grad():
                ours = lightning_attention(q, k, v, slopes, backend="triton")
                row["triton vs fla rel err"] = rel_err(ours, fla(q, k, v, slopes))
        a, s = row.get("triton lightning ms"), row.get("sdpa causal ms")
        if a and s:
            row["sdpa / triton"] = s / a
        a2 = row.get("fla chunk_simple_gla ms")
        if a and a2:
            row["fla / triton"] = a2 / a
        rows.append(row)
    failed = any(r.get(f"{n} error") for r in rows for n in ("triton lightning", "sdpa causal"))
    return dict(status="FAILED" if failed else "ok", rows=rows,
                note="" if fla is not None else fla_reason)


# ------------------------------------------------------------------------------ 3. train
def section_train(args, budget: Budget, device: str) -> dict:
    steps = 3 if args.smoke else 50
    precision = "fp32" if device != "cuda" else "bf16"
    run_dir = Path(args.out) / "tiny_run"
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()
    cmd = [
        sys.executable, "-m", "plait.launcher.train", "--config", str(ROOT / "configs/tiny.yaml"),
        "--set", f"out_dir={run_dir}", "--set", f"training.steps={steps}",
        "--set", f"training.precision={precision}", "--set", "training.eval_every=0",
        "--set", "logging.progress_bar=false", "--set", "logging.tensorboard=false",
        "--set", "checkpoint.resume=never",
    ]
    env = dict(os.environ)
    if device != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU path even on a GPU host
    if budget.left() - args.reserve < 15:
        return dict(status="skipped", reason="time budget", command=" ".join(cmd[1:]))
    # smoke: the budget decides what starts, never kills a started run (a loaded CI machine
    # is slow, not wrong); on a GPU a run must end within the budget
    timeout = (
        args.train_timeout if args.smoke else min(args.train_timeout, budget.left() - args.reserve)
    )
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="FAILED", reason=f"launcher run killed after {timeout:.0f} s",
                    command=" ".join(cmd))
    seconds = time.perf_counter() - t0
    losses = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "train":
                losses.append(r["loss"])
    res = dict(command=" ".join(cmd[1:]), steps=steps, precision=precision,
               backend="nccl" if device == "cuda" else "gloo", seconds=round(seconds, 1),
               exit_code=p.returncode, losses=[round(x, 4) for x in losses])
    if p.returncode != 0 or len(losses) != steps:
        res.update(status="FAILED", stderr=p.stderr[-2000:])
        return res
    finite = all(math.isfinite(x) for x in losses)
    if args.smoke:
        res["loss_check"] = "finite only (3 steps, inside the warmup)"
        res["status"] = "ok" if finite else "FAILED"
    else:
        first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
        res.update(first5=round(first, 4), last5=round(last, 4))
        res["status"] = "ok" if finite and last < first else "FAILED"
    return res


# ------------------------------------------------------------------------------ 4. families
def model_flops_per_token(cfg, vocab: int, lengths: list[int]) -> float:
    """Training FLOPs per token from plait's cost model (plait.models.common.cost: 3 x
    forward, every matmul plus each letter's mixing FLOPs over the documents), as
    benchmarks/train_step.py counts them."""
    from plait.models.common import cost

    return cost.training_flops(cfg, vocab, lengths)


class _Rows:
    """The loader interface train_step reads: the same packed row every step."""

    def __init__(self, b: dict):
        self.b = b

    def next_micro_batch(self) -> dict:
        return self.b


def family_worker(spec: dict) -> None:
    """One family's training steps in this (fresh) process; prints RESULT <json>."""
    import torch

    from plait.launcher.config import load_config
    from plait.launcher.engine import build_engine
    from plait.launcher.loop import Loop
    from plait.models.common import build_model, param_count
    from plait.parallel import runtime

    T, vocab, device = spec["T"], spec["vocab"], spec["device"]
    sets = [
        f"model.preset={spec['preset']}", "training.micro_batch_size=1",
        f"training.precision={spec['precision']}", "training.steps=1000000",
        "training.eval_every=0", "logging.progress_bar=false", "logging.tensorboard=false",
        f"data.seq_len={T}",
    ]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", sets)
    cfg.out_dir = spec["out_dir"]
    t0 = time.perf_counter()
    rt = runtime.initialize(cfg.parallel, cfg.training.seed)
    model = build_model(cfg.model, rt.tp, vocab_size=vocab)
    engine, _, scheduler = build_engine(model, cfg, rt)
    build_s = time.perf_counter() - t0
    n_docs = max(1, T // spec["doc_len"])
    lengths = [T // n_docs] * n_docs
    lengths[-1] += T - sum(lengths)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, vocab, (1, T + 1), generator=g)
    n = torch.tensor(lengths)
    rows = _Rows({
        "tokens": seq[:, :-1], "labels": seq[:, 1:],
        "doc_ids": torch.repeat_interleave(torch.arange(len(lengths)), n)[None],
        "positions": torch.cat([torch.arange(int(L)) for L in lengths])[None],
    })
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(1 + spec["steps"]):  # the first compiles and autotunes
        _sync(device)
        t1 = time.perf_counter()
        losses.append(Loop(cfg, rt, engine, scheduler, rows).step().loss)
        _sync(device)
        times.append(time.perf_counter() - t1)
    step_s = statistics.median(times[1:])
    flops = model_flops_per_token(cfg.model, vocab, lengths)
    out = dict(preset=spec["preset"], T=T, docs=n_docs, params=param_count(cfg.model, vocab),
               build_s=round(build_s, 1), first_step_s=round(times[0], 2),
               step_s=round(step_s, 4), tokens_per_s=round(T / step_s, 1),
               flops_per_token=flops, achieved_tflops=T / step_s * flops / 1e12,
               losses=[round(x, 4) for x in losses])
    if device == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(out), flush=True)


def section_families(args, budget: Budget, device: str, gemm: dict) -> dict:
    from plait.models.presets import one_b

    if args.smoke:
        presets = {"transnormer": "transnormer-tiny"}
        T, precision, steps, vocab, doc_len = 64, "fp32", 1, 2048, 32
    else:
        presets = one_b()
        T, precision, steps, vocab, doc_len = 8192, "bf16", 2, 32000, 2048
    rows = []
    env = dict(os.environ)
    if device != "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ""
    for fam, preset in presets.items():
        left = budget.left() - args.reserve
        if left < (10 if args.smoke else 45):
            rows.append(dict(family=fam, preset=preset, status="skipped", reason="time budget"))
            continue
        spec = dict(preset=preset, T=T, precision=precision, steps=steps, vocab=vocab,
                    doc_len=doc_len, device=device,
                    out_dir=str(Path(args.out) / "family_runs" / preset))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--family-worker", json.dumps(spec)]
        timeout = args.family_timeout if args.smoke else min(args.family_timeout, left)
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append(dict(family=fam, preset=preset, status="FAILED",
                             reason=f"killed after {timeout:.0f} s"))
            continue
        res = [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not res:
            rows.append(dict(family=fam, preset=preset, status="FAILED",
                             reason=f"exit {p.returncode}", stderr=p.stderr[-2000:]))
            continue
        r = dict(family=fam, status="ok", **res[0])
        if gemm.get("peak_tflops"):
            r["mfu_peak"] = r["achieved_tflops"] / gemm["peak_tflops"]
        if gemm.get("measured_tflops"):
            r["mfu_gemm"] = r["achieved_tflops"] / gemm["measured_tflops"]
        if not all(math.isfinite(x) for x in r["losses"]):
            r["status"] = "FAILED"
            r["reason"] = "non-finite loss"
        rows.append(r)
    failed = any(r["status"] == "FAILED" for r in rows)
    return dict(status="FAILED" if failed else "ok", rows=rows, T=T, precision=precision,
                vocab=vocab, doc_len=doc_len)


# ------------------------------------------------------------------------------ report
def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def summary(report: dict) -> str:
    """Every check of the run in one table, a row each: section, case, status, figure (the
    sections' own tables below have the detail)."""
    rows = []
    s = report["sections"]
    for r in s.get("kernels", {}).get("rows", []):
        shape = "x".join(str(r[n]) for n in ("B", "H", "T", "D", "E", "C", "K") if n in r)
        var = ("docs " if r.get("docs") else "") + ("init " if r.get("init") else "") + (
            "g " if r.get("g") else "") + (f"{r['form']} state " if r.get("form") else "")
        fig = (f"rel err {_fmt(r['worst'])} (tolerance {_fmt(r['tolerance'])})" if "worst" in r
               else r.get("error", "").splitlines()[-1][:120] if r.get("error") else "")
        rows.append(("kernels", f"{r['kernel']} {shape} {r['dtype']} {var}seed {r['seed']}",
                     "ok" if r["ok"] else "FAILED", fig))
    for r in s.get("kernels", {}).get("skipped", []):
        rows.append(("kernels", f"{r['kernel']} {r['dtype']}", "skipped", r["reason"]))
    for r in s.get("attention", {}).get("rows", []):
        if "skipped" in r:
            rows.append(("attention", f"T={r['T']}", "skipped", r["skipped"]))
            continue
        ratio = r.get("sdpa / triton")
        rows.append(("attention", f"T={r['T']} {r['B']}x{r['H']}x{r['D']} {r['dtype']}", "ok",
                     f"triton {_fmt(r.get('triton lightning ms'))} ms, "
                     f"SDPA / triton {_fmt(ratio)}"))
    t = s.get("train")
    if t:
        losses = t.get("losses") or []
        fig = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else t.get("reason", "")
        rows.append(("train", f"configs/tiny.yaml, {t.get('steps', '-')} steps", t["status"],
                     fig))
    for r in s.get("families", {}).get("rows", []):
        if r["status"] == "ok":
            mp = r.get("mfu_peak")
            fig = (f"{r['step_s']} s/step, {r['tokens_per_s']:,.0f} tokens/s, MFU "
                   f"{'-' if mp is None else f'{mp:.1%}'}, {r.get('peak_mem_gib', '-')} GiB")
        else:
            fig = r.get("reason", "")
        rows.append(("families", f"{r['family']} ({r['preset']})", r["status"], fig))
    for name, sec in s.items():
        if sec.get("error"):
            rows.append((name, "the section", "FAILED", sec["error"].splitlines()[-1][:120]))
    lines = ["| section | check | status | figure |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"GPU check ({'smoke, CPU' if report['smoke'] else 'GPU'}): `{report['command']}`",
        "",
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}; "
        f"{report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget; "
        f"Triton autotuning: {env['autotune']}; "
        f"overall: **{report['status']}**.",
        "",
        "Seconds per section: "
        + ", ".join(f"{k} {v['seconds']} ({v['status']})" for k, v in report["sections"].items())
        + ".",
        "",
        "### Every check",
        "",
        summary(report),
        "",
    ]
    s = report["sections"]
    k = s.get("kernels")
    if k:
        lines += [
            f"### Kernels against their references ({k['status']})",
            "",
            "Relative Frobenius error against float64 from the same inputs; worst over outputs "
            "and gradients.",
            "",
            "| kernel | shape | dtype | docs/init | seed | worst rel err | tolerance | ok |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in k["rows"]:
            shape = " ".join(f"{n}={r[n]}" for n in ("B", "H", "T", "D", "E", "C", "K", "window")
                             if n in r)
            var = f"{int(r.get('docs', 0))}/{int(r.get('init', 0))}"
            var += (" g" if r.get("g") else "") + (f" {r['form']} state" if r.get("form") else "")
            worst = _fmt(r.get("worst")) if "worst" in r else "error"
            ok = "yes" if r["ok"] else "**no**"
            lines.append(f"| {r['kernel']} | {shape} | {r['dtype']} | {var} | {r['seed']} "
                         f"| {worst} | {_fmt(r.get('tolerance'))} | {ok} |")
        for r in k["skipped"]:
            lines.append(f"| {r['kernel']} | | {r['dtype']} | | | skipped: {r['reason']} | | |")
        lines.append("")
    a = s.get("attention")
    if a:
        lines += [f"### Lightning attention vs fla and SDPA, fwd+bwd ({a['status']})", ""]
        if a.get("error"):
            lines += ["```", a["error"], "```", ""]
        if a.get("note"):
            lines += [f"fla: skipped ({a['note']}).", ""]
        cols = ["triton lightning ms", "fla chunk_simple_gla ms", "sdpa causal ms",
                "sdpa / triton", "fla / triton", "triton vs fla rel err"]
        lines += ["| T | B x H x D | dtype | " + " | ".join(cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for r in a["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['T']} | skipped: {r['skipped']} |")
                continue
            lines.append(f"| {r['T']} | {r['B']}x{r['H']}x{r['D']} | {r['dtype']} | "
                         + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    t = s.get("train")
    if t:
        lines += [f"### configs/tiny.yaml through the launcher ({t['status']})", ""]
        if "losses" in t:
            lines.append(
                f"{t['steps']} steps, {t['precision']}, {t['backend']}, {t['seconds']} s; "
                f"loss {t['losses'][0] if t['losses'] else '-'} -> "
                f"{t['losses'][-1] if t['losses'] else '-'}"
                + (
                    f" (mean of first 5 {t['first5']}, last 5 {t['last5']})"
                    if "first5" in t
                    else ""
                )
                + (f"; {t['loss_check']}" if "loss_check" in t else "")
            )
        else:
            lines.append(t.get("reason", ""))
        lines.append("")
    f = s.get("families")
    if f:
        g = report.get("gemm", {})
        lines += [
            f"### One training step per family, {f['T']} tokens, {f['precision']} ({f['status']})",
            "",
            f"Peak: {_fmt(g.get('peak_tflops'))} TFLOP/s ({g.get('peak_source', '-')}); "
            f"measured {g.get('dtype', '')} GEMM (n={g.get('n', '-')}): "
            f"{_fmt(g.get('measured_tflops'))} TFLOP/s. Vocabulary {f['vocab']}, documents of "
            f"{f['doc_len']} tokens packed in the row.",
            "",
            "| family | preset | params | step s | tokens/s | TFLOP/s | MFU (peak) | MFU (GEMM) "
            "| peak mem GiB | status |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in f["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['family']} | {r['preset']} | | | | | | | | "
                             f"{r['status']}: {r.get('reason', '')} |")
                continue
            mp, mg = r.get("mfu_peak"), r.get("mfu_gemm")
            lines.append(
                f"| {r['family']} | {r['preset']} | {r['params'] / 1e6:.0f}M | {r['step_s']} "
                f"| {r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.3g} "
                f"| {'-' if mp is None else f'{mp:.1%}'} | {'-' if mg is None else f'{mg:.1%}'} "
                f"| {r.get('peak_mem_gib', '-')} | ok |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="directory for gpu_check.json and gpu_check.md (required)")
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes (CI)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default 470; smoke 120)")
    p.add_argument("--sections", default="kernels,attention,train,families")
    p.add_argument("--reserve", type=float, default=None,
                   help="seconds kept back for the report (default 10; smoke 2)")
    p.add_argument("--train-timeout", type=float, default=None, help="default 150 s (smoke 300)")
    p.add_argument("--family-timeout", type=float, default=None, help="default 100 s (smoke 300)")
    p.add_argument(
        "--write-doc",
        action="store_true",
        help="also put the tables in docs/benchmarks.md (the gpu-check section); not in smoke",
    )
    p.add_argument("--attention-timeout", type=float, default=None, help="default 150 (smoke 300)")
    p.add_argument(
        "--autotune",
        action="store_true",
        help="autotune the kernels in every section (default: only in the attention timing; "
        "elsewhere the config the compile test checks, to keep the 8 minutes for measuring)",
    )
    p.add_argument("--family-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--attention-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.family_worker:
        family_worker(json.loads(args.family_worker))
        return 0
    if args.attention_worker:
        attention_worker(json.loads(args.attention_worker))
        return 0
    if not args.out:
        p.error("the following argument is required: --out")
    if not args.autotune:  # before the kernel modules are imported (they read it once)
        os.environ["PLAIT_TRITON_AUTOTUNE"] = "0"
    if args.smoke:
        # before any @triton.jit runs (the kernel modules are imported lazily below)
        os.environ["TRITON_INTERPRET"] = "1"
    # smoke: about 50 s here; the budget is a ceiling for a loaded CI machine, not a target
    args.budget = args.budget or (120.0 if args.smoke else 470.0)
    args.reserve = args.reserve if args.reserve is not None else (2.0 if args.smoke else 10.0)
    for name, gpu in (
        ("train_timeout", 150.0),
        ("family_timeout", 100.0),
        ("attention_timeout", 150.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, 300.0 if args.smoke else gpu)
    budget = Budget(args.budget)
    t0 = time.perf_counter()
    import torch
    import triton

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if not cuda and not args.smoke:
        print("gpu_check: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'cpu'})"
    report = dict(
        smoke=args.smoke, budget_s=args.budget,
        command="python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
        environment=dict(device=name, torch=torch.__version__, triton=triton.__version__,
                         python=platform.python_version(),
                         interpreter=os.environ.get("TRITON_INTERPRET") == "1",
                         autotune="every section" if args.autotune else
                         "attention timing only (elsewhere the compile test's config)"),
        sections={},
    )
    peak = peak_tflops(name) if cuda else None
    source = "datasheet, dense bf16" if peak else ("no table entry" if cuda else "none on CPU")
    gemm = dict(peak_tflops=peak, dtype="bf16" if cuda else "fp32", n=8192 if cuda else 256,
                peak_source=source)
    gemm["measured_tflops"] = gemm_tflops(device, gemm["dtype"], gemm["n"], 10 if cuda else 3)
    report["gemm"] = gemm
    wanted = args.sections.split(",")
    sections = dict(
        kernels=lambda: section_kernels(args, budget, device),
        attention=lambda: section_attention(args, budget, device),
        train=lambda: section_train(args, budget, device),
        families=lambda: section_families(args, budget, device, gemm),
    )
    for sec in wanted:
        ts = time.perf_counter()
        print(f"gpu_check: {sec} ...", file=sys.stderr, flush=True)
        try:
            res = sections[sec]()
        except Exception as e:
            res = dict(status="FAILED", error=_err(e))
        res["seconds"] = round(time.perf_counter() - ts, 1)
        report["sections"][sec] = res
        print(f"gpu_check: {sec} {res['status']} in {res['seconds']} s", file=sys.stderr,
              flush=True)
    report["seconds"] = time.perf_counter() - t0
    report["status"] = (
        "FAILED" if any(r["status"] == "FAILED" for r in report["sections"].values()) else "ok"
    )
    out = Path(args.out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    if args.write_doc and not args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_section

        write_section("gpu-check", "## GPU check\n\n" + markdown(report))
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
