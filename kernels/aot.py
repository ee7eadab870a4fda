"""What ahead-of-time compiles of the Triton kernels are held to, and the shapes they run at.

kernels/launches.py compiles the wrappers' own launches for ``GPUTarget("cuda", arch, 32)``;
this module reads what a real launch would be held to: shared memory from Triton's metadata,
registers and spill bytes from the ``ptxas -v`` that ships inside the triton wheel, and keeps
the preset shapes. Triton keeps its compiled kernels in its own cache (``TRITON_CACHE_DIR``,
default ~/.triton/cache), and the ``ptxas -v`` figures are kept beside them, keyed by the
PTX's hash, so a run whose kernels did not change spends its time only on what did (the CI
test: about 25 s cold, a few seconds warm).

Limits of the targets (bytes of shared memory one block may opt into): sm_90 232,448
(H100/H200), sm_80 166,912 (A100).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton

SMEM_LIMIT = {90: 232_448, 80: 166_912}
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@dataclass(frozen=True)
class CompileResult:
    kernel: str
    arch: int
    shared: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    num_warps: int
    num_stages: int


def _stats_cache() -> Path:
    base = os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"
    return Path(base) / "plait-ptxas"


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill bytes) of one kernel, from the cache when this PTX was seen before."""
    key = hashlib.sha256(f"{arch}\0{PTXAS.stat().st_size}\0{ptx}".encode()).hexdigest()
    cached = _stats_cache() / f"{key}.json"
    try:
        regs, spills = json.loads(cached.read_text())
        return int(regs), int(spills)
    except (OSError, ValueError):
        pass
    regs, spills = _run_ptxas(ptx, arch)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([regs, spills]))
        tmp.replace(cached)  # atomic: concurrent runs never read half a file
    except OSError:
        pass  # a read-only cache only costs time
    return regs, spills


def _run_ptxas(ptx: str, arch: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        out = subprocess.run(
            [str(PTXAS), "-v", f"--gpu-name={sm}", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = max(int(m) for m in re.findall(r"Used (\d+) registers", out))
    stores = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", out))
    loads = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", out))
    return regs, stores + loads


# ------------------------------------------------------------------ the preset shapes
# Spill budget, bytes per thread: none, on either target in either dtype. (sm_80's fp32 had
# 2 KB while lightning's dq/dk kernel spilled at 32 x 32 tiles under tf32x3's three mma.sync
# products per dot; its own 16 x 16 tiles do not: lightning/triton.py ``dqdk_meta``.)
def spill_budget(arch: int, dtype: str) -> int:
    return 0


# lightning (D, E): TransNormerLLM head dim 64 (25m) and 128 (385m, 1b), 256 x 128 on the LRPE
# layer (q, k doubled by cos/sin); Based's feature width 1 + 16 + 136 = 153 with its value dim
# + 1 (the normaliser column): 33 (25m), 65 (360m), 113 (1.3b).
LIGHTNING_SHAPES = {
    "transnormer-25m": (64, 64),
    "transnormer-385m/1b": (128, 128),
    "transnormer LRPE layer": (256, 128),
    "based-25m": (153, 33),
    "based-360m": (153, 65),
    "based-1.3b": (153, 113),
}
# lightning with per-token decays (Mamba-2's D layers): (state, head_dim)
MAMBA2_SHAPES = {
    "mamba2-tiny": (16, 16),
    "mamba2-25m": (64, 64),
    "bamba-9b / mamba2-1b": (128, 64),
}
# sliding window (D = E): Based's W layers (32, 64, 112) and the generic head dims 128, 256
SWA_SHAPES = {
    "based-25m": 32,
    "based-360m": 64,
    "based-1.3b": 112,
    "head 128": 128,
    "head 256": 256,
}
SHORTCONV_TAPS = {"based (K=3)": 3, "K=4": 4}
# gated delta rule's chunk scan (K, V): Qwen3.5's 128 x 128 heads (and 128 x 256 under context
# parallelism, where the values carry K more columns), gdn-25m's 64 x 64, gdn-tiny's 16 x 16;
# float32 whatever the model's dtype (the maps and states sum the whole prefix)
GATED_DELTA_SHAPES = {
    "qwen3.5": (128, 128),
    "qwen3.5 under CP": (128, 256),
    "gdn-25m": (64, 64),
    "gdn-tiny": (16, 16),
}
ARCHS = (90, 80)
