"""Ahead-of-time compiles of exactly what a launch compiles, on a machine without a GPU.

kernels/aot.py compiles one hand-described case per kernel. This module instead calls the
wrappers themselves (``lightning_attention_triton`` and the rest, forward and backward) on
CPU tensors of a preset's shapes while every Triton launch they make is *recorded instead of
run* (``recorded``), then compiles each recorded launch as Triton's launcher would compile it:
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

    python -m plait.kernels.launches [--quick]     # one JSON object per compiled launch
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
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
def recorded(arch: int) -> Iterator[list[Launch]]:
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
              (tc, "AUTOTUNE", tc.AUTOTUNE)]
    Autotuner.run, JITFunction.run, tc.AUTOTUNE = record_autotuned, record_jit, True
    try:
        yield launches
    finally:
        for obj, attr, old in reversed(saved):
            setattr(obj, attr, old)


def kept_configs(launch: Launch, arch: int) -> list[dict]:
    """The launch options and config constexprs of every configuration the launch can run:
    an autotuner's configs after its pruner (for ``arch``), or the plain launch's own."""
    from triton.runtime.autotuner import Autotuner

    k = launch.kernel
    if not isinstance(k, Autotuner):
        opts = {o: launch.kwargs[o] for o in ("num_warps", "num_stages") if o in launch.kwargs}
        return [dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3))]
    with recorded(arch):  # the pruner asks the target's shared memory and arch
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


def _key(fn, signature, constexprs, attrs, options, arch) -> str:
    parts = [fn.__module__, fn.__name__, fn.cache_key, str(arch), repr(sorted(signature.items())),
             repr(sorted((str(k), repr(v)) for k, v in constexprs.items())),
             repr(sorted((str(k), repr(v)) for k, v in attrs.items())),
             repr(sorted((k, repr(v)) for k, v in options.__dict__.items()))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@functools.cache
def _compile_bound(key: str, fn, signature_items, constexpr_items, attr_items, options_items,
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
    key = _key(fn, signature, constexprs, attrs, options, arch)
    hinted = sorted(fn.arg_names[p[0]] for p in attrs if signature[fn.arg_names[p[0]]] == "i32")
    res = _compile_bound(key, fn, tuple(signature.items()), tuple(constexprs.items()),
                         tuple((k, tuple(map(tuple, v))) for k, v in attrs.items()),
                         tuple(options.__dict__.items()), arch)
    return res, {"hinted": hinted}


# ------------------------------------------------------------------ the wrappers' calls
def _lightning_calls(D: int, E: int, dt: torch.dtype, T: int, docs: bool, init: bool,
                     g: bool) -> Callable[[], None]:
    def run():
        from plait.kernels.lightning.triton import lightning_attention_triton

        gen = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, 2, T, D, generator=gen).to(dt).requires_grad_() for _ in "qk")
        v = torch.randn(1, 2, T, E, generator=gen).to(dt).requires_grad_()
        doc_ids = (torch.arange(T) // 300)[None] if docs else None
        s0 = torch.zeros(1, 2, D, E, requires_grad=True) if init else None
        gg = (-torch.rand(1, 2, T)).requires_grad_() if g else None
        o, s = lightning_attention_triton(q, k, v, torch.tensor([0.1, 0.2]), doc_ids, s0, True,
                                          g_BHT=gg)
        (o.float().sum() + s.sum()).backward()

    return run


def _chunk_state_calls(D: int, E: int, dt: torch.dtype, T: int, docs: bool, g: bool):
    def run():
        from plait.kernels.lightning.triton import lightning_chunk_state_triton

        k = torch.randn(1, 2, T, D).to(dt)
        v = torch.randn(1, 2, T, E).to(dt)
        doc_ids = (torch.arange(T) // 300)[None] if docs else None
        gg = -torch.rand(1, 2, T) if g else None
        lightning_chunk_state_triton(k, v, torch.tensor([0.1, 0.2]), doc_ids, g_BHT=gg)

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


def calls(quick: bool) -> Iterator[tuple[dict, Callable[[], None]]]:
    """(label, a call of a wrapper forward + backward) for every preset shape, dtype and
    variant; ``quick``: a representative subset (the widest and the odd shapes, documents
    and initial state on, one length)."""
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    lengths = (1000,) if quick else (1000, 8192)
    for T in lengths:
        for dname, dt in dtypes.items():
            for shape, (D, E) in {**LIGHTNING_SHAPES, **MAMBA2_SHAPES}.items():
                g = shape in MAMBA2_SHAPES
                if quick and shape not in ("transnormer-385m/1b", "based-1.3b",
                                           "bamba-9b / mamba2-1b"):
                    continue
                for docs, init in [(True, True)] if quick else [(False, False), (True, True)]:
                    label = dict(op="lightning g" if g else "lightning", shape=f"{shape} {D}x{E}",
                                 dtype=dname, variant=f"T={T} docs={int(docs)} init={int(init)}")
                    yield label, _lightning_calls(D, E, dt, T, docs, init, g)
                label = dict(op="lightning chunk state", shape=f"{shape} {D}x{E}", dtype=dname,
                             variant=f"T={T} docs=1")
                yield label, _chunk_state_calls(D, E, dt, T, True, g)
            for shape, D in SWA_SHAPES.items():
                if dt == torch.float32 and D > 128:
                    continue  # refused at the wrapper
                if quick and shape not in ("based-1.3b", "head 128"):
                    continue
                yield (dict(op="swa", shape=f"{shape} {D}", dtype=dname, variant=f"T={T} docs=1"),
                       _swa_calls(D, dt, T, True))
            for shape, K in SHORTCONV_TAPS.items():
                yield (dict(op="shortconv", shape=shape, dtype=dname, variant=f"T={T} docs=1"),
                       _shortconv_calls(K, dt, T, True))
        for shape, (K, V) in GATED_DELTA_SHAPES.items():  # float32 at every model dtype
            if quick and shape != "qwen3.5":
                continue
            yield (dict(op="gated_delta", shape=f"{shape} {K}x{V}", dtype="fp32",
                        variant=f"T={T} init=1"), _scan_calls(K, V, T, True))


def _import_wrappers() -> None:
    """The kernel modules imported before any recording, so that ``recorded`` finds the
    names it replaces in each of them."""
    import plait.kernels.gated_delta.triton  # noqa: F401
    import plait.kernels.lightning.triton  # noqa: F401
    import plait.kernels.shortconv.triton  # noqa: F401
    import plait.kernels.swa.triton  # noqa: F401


def matrix(quick: bool = False) -> Iterator[dict]:
    """One row per (call, launch, kept config, arch): what compiles and what it uses."""
    _import_wrappers()
    for label, call in calls(quick):
        for arch in ARCHS:
            with recorded(arch) as launches:
                call()
            seen = set()
            for launch in launches:
                for config in kept_configs(launch, arch):
                    row = dict(label, kernel=launch.fn.__name__, arch=arch,
                               warps=config["num_warps"], stages=config["num_stages"])
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
                               spills=res.spill_bytes, **extra)


def main() -> None:
    for row in matrix(quick="--quick" in sys.argv):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
