"""Ahead-of-time compiles of exactly what a launch compiles, on a machine without a GPU.

The compile test used to describe one case per kernel by hand (and gave every integer a
divisibility hint no launch has). This module calls the wrappers themselves
(``lightning_attention_triton`` and the rest, forward and backward) on CPU tensors of a
preset's shapes while every Triton launch they make is *recorded instead of run*
(``recorded``), then compiles each recorded launch as Triton's launcher would compile it:
  * the argument binding is Triton's own (``create_function_from_signature`` and
    ``JITFunction._pack_args``, what ``JITFunction.run`` calls): 16-divisibility only on the
    integers and pointers that have it (D = 153, T = 1000 get none; T gets none at all where
    the kernel says ``do_not_specialize``), integers equal to 1 folded, pointer alignment
    from the tensors;
  * every configuration the kernel's autotuner keeps after its pruner has run on the
    recorded arguments with the target's shared memory and arch (``PLAIT_TRITON_AUTOTUNE=1``,
    as a training run autotunes);
  * for sm_80 and sm_90, with the registers and spills ptxas reports (kernels/aot.py).
So a configuration that spills, or a hint that no launch has, cannot hide in the table.
``--all-configs`` compiles every configuration the pruners keep without the spill table
(kernels/spills.json, which benchmarks/gpu_compile.py writes from that run).

    python -m plait.kernels.launches [--ci] [--all-configs]   # one JSON row per compile
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from plait.kernels.aot import (
    GATED_DELTA_SHAPES,
    LIGHTNING_SHAPES,
    MAMBA2_SHAPES,
    SHORTCONV_TAPS,
    SMEM_LIMIT,
    SWA_SHAPES,
    CompileResult,
    _ptxas_stats,
)

ARCHS = (90, 80)


@dataclass
class Launch:
    """One recorded launch: the kernel object launched (an Autotuner or a JITFunction), its
    positional arguments and keyword arguments (constexprs and launch options)."""

    kernel: object
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def fn(self):
        from triton.runtime.autotuner import Autotuner

        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel


@contextlib.contextmanager
def recorded(arch: int, use_spill_table: bool = True) -> Iterator[list[Launch]]:
    """Inside the block, plait's Triton launches are appended to the yielded list and not
    run; the wrappers' device guard accepts CPU tensors, and the autotune pruners see the
    target ``arch`` and its shared memory (they ask ``smem_limit``/``device_arch``) with
    autotuning on. Outputs the kernels would have written stay uninitialised."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from plait.kernels import triton_common as tc

    launches: list[Launch] = []

    def record_autotuned(self, *args, **kwargs):
        kwargs.pop("grid", None), kwargs.pop("warmup", None)
        launches.append(Launch(self, args, kwargs))

    def record_jit(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    replaced = {
        "check_device": lambda *a, **k: None,
        "smem_limit": lambda: SMEM_LIMIT[arch],
        "device_arch": lambda: arch,
    }
    saved: list[tuple[object, str, object]] = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("plait.kernels"):
            continue
        for attr, new in replaced.items():
            if hasattr(module, attr):
                saved.append((module, attr, getattr(module, attr)))
                setattr(module, attr, new)
    saved += [(Autotuner, "run", Autotuner.run), (JITFunction, "run", JITFunction.run),
              (tc, "AUTOTUNE", tc.AUTOTUNE), (tc, "USE_SPILL_TABLE", tc.USE_SPILL_TABLE)]
    Autotuner.run, JITFunction.run, tc.AUTOTUNE = record_autotuned, record_jit, True
    tc.USE_SPILL_TABLE = use_spill_table
    try:
        yield launches
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def all_configs(launch: Launch) -> list[dict]:
    """Every configuration the launch's autotuner lists, before pruning."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(launch.kernel, Autotuner):
        return kept_configs(launch, 90)
    return [dict(c.all_kwargs()) for c in launch.kernel.configs]


def kept_configs(launch: Launch, arch: int, use_spill_table: bool = True) -> list[dict]:
    """The launch options and config constexprs of every configuration the launch can run:
    an autotuner's configs after its pruner (for ``arch``; ``use_spill_table=False``: the
    pruner without the spill table, every configuration the table is measured over), or the
    plain launch's own."""
    from triton.runtime.autotuner import Autotuner

    k = launch.kernel
    if not isinstance(k, Autotuner):
        opts = {o: launch.kwargs[o] for o in ("num_warps", "num_stages") if o in launch.kwargs}
        return [dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3))]
    with recorded(arch, use_spill_table):  # the pruner asks the target's memory and arch
        named = dict(zip(k.arg_names, launch.args, strict=False))
        configs = k.configs
        if k.early_config_prune:
            configs = k.early_config_prune(k.configs, named, **launch.kwargs)
    return [dict(c.all_kwargs()) for c in configs]


def _binding(fn, args, kwargs, arch):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` derives them for
    these arguments on a ``cuda`` target of ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return signature, constexprs, attrs, options


@functools.cache
def _compile_bound(fn, signature_items, constexpr_items, attr_items, options_items,
                   arch: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real code generator
    opts = dict(options_items)
    src = ASTSource(fn, dict(signature_items), dict(constexpr_items), dict(attr_items))
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    regs, spills = _ptxas_stats(k.asm["ptx"], arch)
    return CompileResult(fn.__name__, arch, k.metadata.shared, regs, spills,
                         opts["num_warps"], opts["num_stages"])


def compile_launch(launch: Launch, config: dict, arch: int) -> tuple[CompileResult, dict]:
    """Compile ``launch`` under one kept ``config`` for ``arch``: (result, the integer
    arguments that got a divisibility hint, for the table)."""
    fn = launch.fn
    kwargs = {**launch.kwargs, **config}
    signature, constexprs, attrs, options = _binding(fn, launch.args, kwargs, arch)
    hinted = sorted(
        fn.arg_names[p[0]] for p, a in attrs.items()
        if signature[fn.arg_names[p[0]]] == "i32" and any(x[0] == "tt.divisibility" for x in a)
    )
    res = _compile_bound(fn, tuple(signature.items()), tuple(constexprs.items()),
                         tuple((k, tuple(map(tuple, v))) for k, v in attrs.items()),
                         tuple(options.__dict__.items()), arch)
    return res, {"hinted": hinted}


# ------------------------------------------------------------------ the wrappers' calls
def _lightning_calls(D: int, E: int, dt: torch.dtype, T: int, docs: bool, init: bool,
                     g: bool, form: str = "sequential") -> Callable[[], None]:
    def run():
        from plait.kernels.lightning.triton import lightning_attention_triton

        os.environ["PLAIT_LIGHTNING_STATE_FORM"] = form  # both forms' kernels are compiled

        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, 2, T, D, generator=gen).to(dt).requires_grad_() for _ in "qk")
        v = torch.randn(1, 2, T, E, generator=gen).to(dt).requires_grad_()
        doc_ids = (torch.arange(T) // 300)[None] if docs else None
        s0 = torch.zeros(1, 2, D, E, requires_grad=True) if init else None
        gg = (-torch.rand(1, 2, T)).requires_grad_() if g else None
        try:
            o, s = lightning_attention_triton(q, k, v, torch.tensor([0.1, 0.2]), doc_ids, s0,
                                              True, g_BHT=gg)
            (o.float().sum() + s.sum()).backward()
        finally:
            os.environ.pop("PLAIT_LIGHTNING_STATE_FORM", None)

    return run


def _chunk_state_calls(D: int, E: int, dt: torch.dtype, T: int, docs: bool, g: bool,
                       form: str = "sequential"):
    def run():
        from plait.kernels.lightning.triton import lightning_chunk_state_triton

        os.environ["PLAIT_LIGHTNING_STATE_FORM"] = form  # both forms' kernels are compiled
        k = torch.randn(1, 2, T, D).to(dt)
        v = torch.randn(1, 2, T, E).to(dt)
        doc_ids = (torch.arange(T) // 300)[None] if docs else None
        gg = -torch.rand(1, 2, T) if g else None
        try:
            lightning_chunk_state_triton(k, v, torch.tensor([0.1, 0.2]), doc_ids, g_BHT=gg)
        finally:
            os.environ.pop("PLAIT_LIGHTNING_STATE_FORM", None)

    return run


def _swa_calls(D: int, dt: torch.dtype, T: int, docs: bool):
    def run():
        from plait.kernels.swa.triton import swa_triton

        q, k, v = (torch.randn(1, 2, T, D).to(dt).requires_grad_() for _ in "qkv")
        doc_ids = (torch.arange(T) // 300)[None] if docs else None
        swa_triton(q, k, v, 64, doc_ids=doc_ids).float().sum().backward()

    return run


def _shortconv_calls(K: int, dt: torch.dtype, T: int, docs: bool):
    def run():
        from plait.kernels.shortconv.triton import short_conv_triton

        x = torch.randn(2, T, 512).to(dt).requires_grad_()
        w = torch.randn(512, K).to(dt).requires_grad_()
        b = torch.randn(512).to(dt).requires_grad_()
        doc_ids = (torch.arange(T) // 300)[None].expand(2, T) if docs else None
        short_conv_triton(x, w, b, doc_ids).float().sum().backward()

    return run


def _scan_calls(K: int, V: int, T: int, init: bool):
    def run():
        from plait.kernels.gated_delta.triton import affine_scan_triton

        n = max(1, T // 64)
        P = torch.randn(1, 2, n, K, K, requires_grad=True)
        M = torch.randn(1, 2, n, K, V, requires_grad=True)
        S0 = torch.randn(1, 2, K, V, requires_grad=True) if init else None
        states, final = affine_scan_triton(P, M, S0)
        (states.sum() + final.sum()).backward()

    return run


CI_CALLS = {
    # Based's odd widths in fp32 (tf32x3), every lightning kernel, both targets
    ("lightning", "based-1.3b 153x113", "fp32"): (90, 80),
    # the per-token-decay variant's chunk state (LASP-2's piece) at Bamba's heads
    ("lightning chunk state", "bamba-9b / mamba2-1b 128x64", "bf16"): (90,),
    # the sliding window at Based's odd head width on the smaller shared memory
    ("swa", "based-1.3b 112", "bf16"): (80,),
    # one launch each of the short convolution and the gated delta scan
    ("shortconv", "based (K=3)", "bf16"): (90,),
    ("gated_delta", "qwen3.5 128x128", "fp32"): (90,),
}
"""The representative subset CI compiles (``--ci``): the shapes and variants whose binding a
blanket hint would change most (odd widths), the chunk-state variant, both targets."""


def calls(tier: str = "full") -> Iterator[tuple[dict, Callable[[], None], tuple[int, ...]]]:
    """(label, a call of a wrapper forward + backward, the targets) for every preset shape,
    dtype and variant; ``tier="ci"``: only ``CI_CALLS`` (documents and initial state on,
    T = 1000)."""
    ci = tier == "ci"
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def wanted(label):
        if not ci:
            return ARCHS
        return CI_CALLS.get((label["op"], label["shape"], label["dtype"]), ())

    for T in (1000,) if ci else (1000, 8192):
        for dname, dt in dtypes.items():
            for shape, (D, E) in {**LIGHTNING_SHAPES, **MAMBA2_SHAPES}.items():
                g = shape in MAMBA2_SHAPES
                variants = [(True, True)] if ci else [(False, False), (True, True)]
                for (docs, init), form in itertools.product(variants, ("sequential", "parallel")):
                    label = dict(op="lightning g" if g else "lightning", shape=f"{shape} {D}x{E}",
                                 dtype=dname,
                                 variant=f"T={T} docs={int(docs)} init={int(init)} {form}")
                    if wanted(label):
                        call = _lightning_calls(D, E, dt, T, docs, init, g, form)
                        yield label, call, wanted(label)
                for form in ("sequential", "parallel"):
                    label = dict(op="lightning chunk state", shape=f"{shape} {D}x{E}",
                                 dtype=dname, variant=f"T={T} docs=1 {form}")
                    if wanted(label):
                        yield label, _chunk_state_calls(D, E, dt, T, True, g, form), wanted(label)
            for shape, D in SWA_SHAPES.items():
                if dt == torch.float32 and D > 128:
                    continue  # refused at the wrapper
                label = dict(op="swa", shape=f"{shape} {D}", dtype=dname, variant=f"T={T} docs=1")
                if wanted(label):
                    yield label, _swa_calls(D, dt, T, True), wanted(label)
            for shape, K in SHORTCONV_TAPS.items():
                label = dict(op="shortconv", shape=shape, dtype=dname, variant=f"T={T} docs=1")
                if wanted(label):
                    yield label, _shortconv_calls(K, dt, T, True), wanted(label)
        for shape, (K, V) in GATED_DELTA_SHAPES.items():  # float32 at every model dtype
            label = dict(op="gated_delta", shape=f"{shape} {K}x{V}", dtype="fp32",
                         variant=f"T={T} init=1")
            if wanted(label):
                yield label, _scan_calls(K, V, T, True), wanted(label)


def _import_wrappers() -> None:
    """The kernel modules imported before any recording, so that ``recorded`` finds the
    names it replaces in each of them."""
    import plait.kernels.gated_delta.triton  # noqa: F401
    import plait.kernels.lightning  # noqa: F401
    import plait.kernels.lightning.triton  # noqa: F401
    import plait.kernels.shortconv.triton  # noqa: F401
    import plait.kernels.swa.triton  # noqa: F401


def spill_key(launch: Launch, arch: int, config: dict) -> str | None:
    """The launch's key in the spill table (triton_common.spill_key), for autotuned kernels."""
    from plait.kernels.triton_common import spill_key as key

    name = getattr(launch.kernel, "spill_name", None)
    if name is None:
        return None
    named = dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    first = next(v for v in launch.args if isinstance(v, torch.Tensor))
    isz = 4 if first.dtype == torch.float32 else 2
    return key(name, arch, isz, named, launch.kwargs, config["num_warps"], config["num_stages"])


def matrix(tier: str = "full", use_spill_table: bool = True) -> Iterator[dict]:
    """One row per (call, launch, kept config, arch): what compiles and what it uses."""
    _import_wrappers()
    for label, call, archs in calls(tier):
        for arch in archs:
            with recorded(arch, use_spill_table) as launches:
                call()
            seen = set()
            for launch in launches:
                kept = kept_configs(launch, arch, use_spill_table)
                pruned = [f"{c['num_warps']}/{c['num_stages']}" for c in all_configs(launch)
                          if c not in kept]
                for config in kept:
                    row = dict(label, kernel=launch.fn.__name__, arch=arch,
                               warps=config["num_warps"], stages=config["num_stages"],
                               pruned=pruned)
                    try:
                        res, extra = compile_launch(launch, config, arch)
                    except Exception as e:  # a launch that does not compile is a result
                        yield dict(row, ok=False, error=f"{type(e).__name__}: {e}"[:500])
                        continue
                    ident = (row["kernel"], res.shared, res.registers, res.spill_bytes,
                             row["warps"], row["stages"], tuple(extra["hinted"]))
                    if ident in seen:  # the same kernel launched twice (forward, backward)
                        continue
                    seen.add(ident)
                    yield dict(row, ok=True, shared=res.shared, registers=res.registers,
                               spills=res.spill_bytes, key=spill_key(launch, arch, config),
                               **extra)


def main() -> None:
    """``--ci``: the CI subset; ``--all-configs``: every configuration the pruners keep
    without the spill table (what the table is written from)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m plait.kernels.launches")
    ap.add_argument("--ci", action="store_true", help="only the CI subset (CI_CALLS)")
    ap.add_argument("--all-configs", action="store_true",
                    help="every configuration the pruners keep without the spill table")
    args = ap.parse_args()
    for row in matrix("ci" if args.ci else "full", use_spill_table=not args.all_configs):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
