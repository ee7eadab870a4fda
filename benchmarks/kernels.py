"""Forward + backward time per token of every token-mixing operator, next to causal SDPA.

    python benchmarks/kernels.py                 # CPU, fp32, 1K..16K; writes docs/benchmarks.md
    python benchmarks/kernels.py --device cuda   # GPU, bf16, 8K and 32K: Triton lightning vs
                                                 # flash-linear-attention (if installed) vs SDPA

Shapes: batch 1, 8 heads, head dim 64 (Based: feature dim 16 on q and k; the convolutions run
on the 512 channels that 8 x 64 make). All operators of a row run in the same process, one
after the other, so ratios are side by side. Targets checked on CPU: lightning's time per token
at 16K within 1.3x of 1K (linear scaling), and at 16K at least 20x faster than SDPA.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import best_time, machine, write_section  # noqa: E402

from plait.kernels.based import based_attention  # noqa: E402
from plait.kernels.gated_delta import gated_delta_rule, l2_normalize  # noqa: E402
from plait.kernels.lightning import lightning_attention  # noqa: E402
from plait.kernels.longconv import long_conv  # noqa: E402
from plait.kernels.shortconv import short_conv  # noqa: E402
from plait.kernels.swa import swa  # noqa: E402
from plait.parallel.cpu_heap import tune_cpu_allocator  # noqa: E402

H, D, FEAT, WINDOW = 8, 64, 16, 256


def _ops(T: int, device: str, dtype: torch.dtype, backend: str):
    """name -> (inputs requiring grad, forward fn)."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device=device)

    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    q, k, v = t(1, H, T, D), t(1, H, T, D), t(1, H, T, D)
    fq, fk = t(1, H, T, FEAT), t(1, H, T, FEAT)
    x = t(1, T, H * D)
    w4 = torch.randn(H * D, 4, device=device, dtype=dtype, requires_grad=True)
    klong = (torch.randn(H * D, T, device=device) / T).requires_grad_()
    g = (-0.1 * torch.rand(1, H, T, device=device, dtype=dtype)).requires_grad_()
    beta = torch.rand(1, H, T, device=device, dtype=dtype, requires_grad=True)
    return {
        "lightning": lambda: lightning_attention(q, k, v, slopes, backend=backend),
        "lightning, per-token decay (D)": lambda: lightning_attention(
            q, k, v, torch.zeros_like(slopes), backend=backend, g=g
        ),
        "gated delta (G)": lambda: gated_delta_rule(
            l2_normalize(q).to(dtype), l2_normalize(k).to(dtype), v, g, beta
        ),
        "based": lambda: based_attention(fq, fk, v, backend=backend),
        f"swa (w={WINDOW})": lambda: swa(q, k, v, WINDOW, backend=backend),
        "short conv (k=4)": lambda: short_conv(x, w4, backend=backend),
        "long conv (fft)": lambda: long_conv(x, klong),
        "sdpa (causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def _fwd_bwd(fn):
    def run():
        out = fn()
        out.backward(torch.ones_like(out))

    return run


def run_cpu(lengths: list[int], reps: int) -> str:
    names = list(_ops(16, "cpu", torch.float32, "chunk"))
    per_tok = {n: {} for n in names}
    for T in lengths:
        for name, fn in _ops(T, "cpu", torch.float32, "chunk").items():
            r = 1 if (name.startswith("sdpa") and T >= 8192) else reps
            per_tok[name][T] = best_time(_fwd_bwd(fn), r) / T * 1e6
            print(f"T={T:6d} {name:18s} {per_tok[name][T]:9.2f} us/token", flush=True)
    lines = ["| operator | " + " | ".join(f"{T // 1024}K" for T in lengths) + " |"]
    lines.append("|---|" + "---|" * len(lengths))
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{per_tok[name][T]:.1f}" for T in lengths) + " |")
    lo, hi = lengths[0], lengths[-1]
    scaling = per_tok["lightning"][hi] / per_tok["lightning"][lo]
    speedup = per_tok["sdpa (causal)"][hi] / per_tok["lightning"][hi]
    checks = [
        f"- lightning time/token at {hi // 1024}K / at {lo // 1024}K: **{scaling:.2f}x** "
        f"(target <= 1.3x): {'met' if scaling <= 1.3 else 'NOT met'}",
        f"- causal SDPA / lightning at {hi // 1024}K (forward+backward): **{speedup:.1f}x** "
        f"(target >= 20x): {'met' if speedup >= 20 else 'NOT met'}",
    ]
    for c in checks:
        print(c)
    return "\n".join(
        [
            "## Kernels, CPU (forward + backward, microseconds per token)",
            "",
            "Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/kernels.py`  ",
            f"Machine: {machine()}  ",
            f"Shapes: batch 1, {H} heads, head dim {D}, fp32; Based feature dim {FEAT}; "
            f"convolutions over {H * D} channels; gated delta: q and k L2-normalised, log-decays "
            f"in [-0.1, 0], beta in [0, 1]. Best of {reps} runs (SDPA at >= 8K: 1 run). "
            "The process runs with the trainer's CPU allocator setting "
            "(`plait.parallel.cpu_heap.tune_cpu_allocator`).",
            "",
            *lines,
            "",
            *checks,
        ]
    )


def _cuda_ops(T: int) -> dict:
    dtype = torch.bfloat16
    q, k, v = (
        torch.randn(1, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)
    )
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], device="cuda")
    ops = {
        "plait lightning (triton)": lambda: lightning_attention(q, k, v, slopes, backend="triton"),
        "sdpa (causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn
    except ImportError:
        return ops
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    ops["fla chunk_lightning_attn"] = lambda: chunk_lightning_attn(
        qt, kt, vt, layer_idx=0, num_layers=2
    )[0]
    return ops


def run_cuda(lengths: list[int], reps: int) -> str:
    rows = []
    for T in lengths:
        for name, fn in _cuda_ops(T).items():
            ms = best_time(_fwd_bwd(fn), reps, torch.cuda.synchronize) * 1e3
            rows.append((T, name, ms))
            print(f"T={T:6d} {name:28s} {ms:9.2f} ms", flush=True)
    lines = ["| T | operator | fwd+bwd ms |", "|---|---|---|"]
    lines += [f"| {T} | {n} | {ms:.2f} |" for T, n, ms in rows]
    return "\n".join(
        [
            "## Kernels, CUDA (bf16, forward + backward)",
            "",
            "Command: `.venv/bin/python benchmarks/kernels.py --device cuda`  ",
            f"Machine: {machine()}",
            "",
            *lines,
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--lengths", type=int, nargs="*", default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    a = p.parse_args()
    if a.device == "cpu":
        tune_cpu_allocator()  # as the trainer does on CPU (parallel/runtime.py says why)
        body = run_cpu(a.lengths or [1024, 2048, 4096, 8192, 16384], a.reps)
        section = "kernels-cpu"
    else:
        body = run_cuda(a.lengths or [8192, 32768], a.reps)
        section = "kernels-cuda"
    if not a.no_write:
        write_section(section, body)


if __name__ == "__main__":
    main()
