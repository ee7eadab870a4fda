"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without one.

``compile_case`` lowers one kernel launch (as described by a kernel module's ``aot_cases``) to
PTX and cubin for ``GPUTarget("cuda", arch, 32)`` and reads what a real launch would be held
to: shared memory from Triton's metadata, registers and spill bytes from the ``ptxas -v`` that
ships inside the triton wheel. Pointer and integer arguments get the ``tt.divisibility`` 16
hint that launches from aligned tensors get (vectorised loads need more shared memory, so
leaving it out would under-report). Results are cached per process (the same tile
configuration serves several shapes) and across runs: Triton keeps its compiled kernels in its
own cache (``TRITON_CACHE_DIR``, default ~/.triton/cache), and the ``ptxas -v`` figures are
kept beside them, keyed by the PTX's hash, so a run whose kernels did not change spends its
time only on what did (the CI test: about 90 s cold, a few seconds warm).

Limits of the targets (bytes of shared memory one block may opt into): sm_90 232,448
(H100/H200), sm_80 166,912 (A100).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

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


def _signature(fn, constexprs: dict, types: dict) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        sig[name] = types[name]
        if types[name].startswith("*") or types[name] == "i32":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


@functools.cache
def _compile(fn, types_items, const_items, num_warps, num_stages, arch) -> CompileResult:
    types, constexprs = dict(types_items), dict(const_items)
    sig, attrs = _signature(fn, constexprs, types)
    src = ASTSource(fn, sig, constexprs, attrs)
    os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real code generator
    k = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    regs, spills = _ptxas_stats(k.asm["ptx"], arch)
    return CompileResult(fn.__name__, arch, k.metadata.shared, regs, spills, num_warps, num_stages)


def compile_case(case: dict, arch: int) -> CompileResult:
    """``case``: fn (a JITFunction), types (non-constexpr argument -> Triton type string, e.g.
    "*bf16", "i32", "fp32"), constexprs, num_warps, num_stages."""
    fn = case["fn"]
    if isinstance(fn, Autotuner):
        fn = fn.fn
    return _compile(
        fn,
        tuple(sorted(case["types"].items())),
        tuple(sorted(case["constexprs"].items())),
        case["num_warps"],
        case["num_stages"],
        arch,
    )


# ------------------------------------------------------------------ the preset shapes
# Spill budget, bytes per thread: none on sm_90; on sm_80 fp32's tf32x3 (three mma.sync
# products per dot) still spills in lightning's dq/dk kernel at 8 warps and 32 x 32 tiles.
def spill_budget(arch: int, dtype: str) -> int:
    return 2048 if (arch, dtype) == (80, "fp32") else 0


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


def matrix(quick: bool = False):
    """(label, case, arch) for every kernel launch at every preset shape, dtype, variant and
    arch. ``quick`` (the CI test): sm_80 in bf16 only, and with documents and initial state
    only (the superset code path), except the main TransNormerLLM shape on sm_90."""
    import torch

    from plait.kernels.gated_delta import triton as gd
    from plait.kernels.lightning import triton as lt
    from plait.kernels.shortconv import triton as sc
    from plait.kernels.swa import triton as sw

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for arch in ARCHS:
        for dname, dt in dtypes.items():
            if quick and arch != 90 and dname != "bf16":
                continue
            main = arch == 90 and dname == "bf16"
            for shape, (D, E) in LIGHTNING_SHAPES.items():
                variants = [(True, True)] if quick else [(False, False), (True, True)]
                if shape == "transnormer-385m/1b" and main:
                    variants = [(False, False), (True, True), (True, False), (False, True)]
                for docs, init in variants:
                    for case in lt.aot_cases(D, E, dt, docs, init):
                        label = dict(op="lightning", shape=f"{shape} {D}x{E}", dtype=dname,
                                     variant=f"docs={int(docs)} init={int(init)}")
                        yield label, case, arch
            for shape, (D, E) in MAMBA2_SHAPES.items():
                if quick and shape != "bamba-9b / mamba2-1b":
                    continue
                for docs, init in [(True, True)] if quick else [(False, False), (True, True)]:
                    for case in lt.aot_cases(D, E, dt, docs, init, has_g=True):
                        label = dict(op="lightning g", shape=f"{shape} {D}x{E}", dtype=dname,
                                     variant=f"docs={int(docs)} init={int(init)}")
                        yield label, case, arch
            for shape, D in SWA_SHAPES.items():
                if dt == torch.float32 and D > 128:
                    continue  # refused at the wrapper (spills); see test_gpu_compile.py
                for docs in (True,) if quick and not main else (False, True):
                    for case in sw.aot_cases(D, D, dt, docs, arch=arch):
                        label = dict(op="swa", shape=f"{shape} {D}", dtype=dname,
                                     variant=f"docs={int(docs)}")
                        yield label, case, arch
            for shape, K in SHORTCONV_TAPS.items():
                for docs in (True,) if quick and not main else (False, True):
                    for case in sc.aot_cases(K, dt, docs):
                        label = dict(op="shortconv", shape=shape, dtype=dname,
                                     variant=f"docs={int(docs)}")
                        yield label, case, arch
            if dname != "fp32" and not (quick and arch != 90):
                continue  # the scan is float32 at every model dtype: once per arch
            for shape, (K, V) in GATED_DELTA_SHAPES.items():
                if quick and shape not in ("qwen3.5", "gdn-tiny"):
                    continue
                for init in (True,) if quick else (False, True):
                    for case in gd.aot_cases(K, V, init):
                        label = dict(op="gated_delta", shape=f"{shape} {K}x{V}", dtype="fp32",
                                     variant=f"init={int(init)}")
                        yield label, case, arch


def main() -> None:
    """Compile the whole matrix; one JSON object per launch on stdout."""
    import json
    import sys

    for label, case, arch in matrix(quick="--quick" in sys.argv):
        row = dict(label, kernel=case["fn"].__name__, arch=arch)
        try:
            r = compile_case(case, arch)
            row.update(ok=True, shared=r.shared, registers=r.registers, spills=r.spill_bytes,
                       num_warps=r.num_warps, num_stages=r.num_stages)
        except Exception as e:  # reported, and the test fails on it
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
        print(json.dumps(row), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
