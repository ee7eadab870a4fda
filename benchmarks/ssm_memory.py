"""Peak memory of building an S4D kernel (H3's diagonal SSM; SeqBoat's EMA is the real case)
with its gradient: the chunked, checkpointed Vandermonde product against the one-shot einsum
that materialises [channels, state, length] powers.

    .venv/bin/python benchmarks/ssm_memory.py     # writes the "ssm-memory" section

Each variant runs in a fresh process; the number is the growth of peak resident memory
(ru_maxrss) over the forward and backward, in MiB. Shape: an H3-1.3B-like layer (1024
channels per TP rank, state 64 = 32 complex pairs) at 4K tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_section  # noqa: E402

C, S, L = 1024, 32, 4096

CHILD = """
import resource, sys, torch
from plait.kernels.longconv import vandermonde
C, S, L = {C}, {S}, {L}
g = torch.Generator().manual_seed(0)
w = torch.complex(torch.randn(C, S, generator=g), torch.randn(C, S, generator=g)).requires_grad_()
logz = torch.complex(-torch.rand(C, S, generator=g) * 0.01, torch.randn(C, S, generator=g))
logz.requires_grad_()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "chunked":
    k = vandermonde(w, logz, L)
else:
    t = torch.arange(L, dtype=torch.float32)
    k = torch.einsum("cs,csl->cl", w, torch.exp(logz[..., None] * t))
k.real.sum().backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def measure(variant: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = CHILD.format(C=C, S=S, L=L)
    out = subprocess.run([sys.executable, "-c", code, variant], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    chunked, oneshot = measure("chunked"), measure("oneshot")
    print(f"chunked {chunked:.0f} MiB, one-shot {oneshot:.0f} MiB")
    lines = [
        "## S4D / EMA kernel memory (CPU)",
        "",
        "Command: `.venv/bin/python benchmarks/ssm_memory.py`  ",
        f"Machine: {machine()}  ",
        f"Kernel of {C} channels, {S} complex state pairs, {L} lags, forward + backward; peak "
        "resident memory growth in a fresh process.",
        "",
        "| variant | peak MiB |",
        "|---|---|",
        f"| one-shot einsum ([C, S, L] powers kept for backward) | {oneshot:.0f} |",
        f"| chunked + checkpointed (`kernels.longconv.vandermonde`) | {chunked:.0f} |",
        "",
        f"Ratio: {oneshot / chunked:.1f}x less with chunking (the [C, L] kernel itself is "
        f"{C * L * 4 / 2**20:.0f} MiB).",
    ]
    write_section("ssm-memory", "\n".join(lines))


if __name__ == "__main__":
    main()
