"""What every Triton wrapper does before a launch: the device guard, doc ids moved to the
kernels' device once and validated, the launch device, and the dtype names ahead-of-time
compilation uses.

One module so that a rule added here (a new capability floor, a check on doc ids) holds for
every kernel at once: lightning, sliding window and short convolution import it, and nothing
here knows of any one kernel. The guard fails at the wrapper with a message that names the
way out (``backend='chunk'``), never at launch with a driver error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Read once at import, as Triton itself does: the interpreter must be chosen before any
@triton.jit runs (tests/conftest.py sets it first)."""

AUTOTUNE = os.environ.get("PLAIT_TRITON_AUTOTUNE", "1") != "0"
"""``PLAIT_TRITON_AUTOTUNE=0``: launch every kernel at the first config its shared-memory
pruner keeps (the fewest warps that do not spill, the most stages that fit, none the spill
table lists) instead of compiling and timing each candidate.
For runs whose minutes are counted (benchmarks/gpu_check.py's correctness section), where
autotuning every shape would spend most of them compiling."""

MIN_CAPABILITY = (8, 0)
"""bf16 tensor cores; the kernels are compile-checked for sm_80 and sm_90
(tests/kernels/test_gpu_compile.py)."""

SMEM_DEFAULT = 232_448
"""Shared memory one block may opt into on an H100/H200 (bytes): what autotune pruning
assumes when no GPU is present to ask."""

TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
"""Triton's names of the dtypes the kernels take (argument types for ahead-of-time compiles)."""


def autotune_configs(warps=(4, 8), stages=(3, 2, 1)):
    """Candidate launch configs, most demanding first (pruners keep the first that fit):
    one under the interpreter, where several configs fail."""
    import triton

    if INTERPRET:
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in stages]


SPILL_TABLE = os.path.join(os.path.dirname(__file__), "spills.json")
"""The launch configurations that spill registers, found by compiling every launch the
wrappers make at every preset shape for sm_80 and sm_90 (kernels/launches.py, written by
benchmarks/gpu_compile.py): {key: spill bytes per thread}. Pruners drop them."""

USE_SPILL_TABLE = True
"""Off only while the table itself is being measured (kernels/launches.py --all-configs)."""


@functools.cache
def _spill_table() -> dict[str, int]:
    try:
        with open(SPILL_TABLE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def spill_key(kernel: str, arch: int, itemsize: int, named_args: dict, constexprs: dict,
              num_warps: int, num_stages: int) -> str:
    """What decides a launch's register use as the launch compiles it: the kernel, the
    target, the element size, the constexprs, which integer sizes are multiples of 16 (the
    divisibility hints Triton gives), the warps and the stages."""
    sizes = sorted(k for k, v in named_args.items() if isinstance(v, int) and not
                   isinstance(v, bool) and k in ("D", "E", "H") and v % 16 == 0)
    flags = ",".join(f"{k}={v}" for k, v in sorted(constexprs.items()))
    return (f"{kernel}|sm_{arch}|{itemsize}|{flags}|div16:{'.'.join(sizes)}"
            f"|{num_warps}/{num_stages}")


def spill_named(name: str, decorator):
    """``decorator`` (a triton.autotune) whose Autotuner is tagged with the name its
    spill-table entries have: the pruner looks its configurations up under it, and
    kernels/launches.py reads it to write the table."""

    def tag(fn):
        tuner = decorator(fn)
        tuner.spill_name = name
        return tuner

    return tag


def spilling(kernel: str, itemsize: int, named_args: dict, constexprs: dict, config) -> int:
    """Spill bytes per thread the table has for this launch under ``config`` on the current
    target (0: none known)."""
    if not USE_SPILL_TABLE:
        return 0
    key = spill_key(kernel, device_arch(), itemsize, named_args, constexprs,
                    config.num_warps, config.num_stages)
    return _spill_table().get(key, 0)


def keep(kept: list, configs: list, spills: Callable[[object], int] | None = None) -> list:
    """What a pruner returns: the configs that fit and do not spill (only the first without
    ``AUTOTUNE``); when every fitting one spills, the one that spills least; when none fits,
    the last, least demanding one (it then fails to compile with Triton's own message, which
    the compile test reports)."""
    if not kept:
        return configs[-1:]
    if spills is not None:
        clean = [c for c in kept if not spills(c)]
        kept = clean or [min(kept, key=spills)]
    return kept if AUTOTUNE else kept[:1]


def check_device(*tensors: torch.Tensor | None, what: str) -> None:
    """Say at the wrapper, not at launch, why a kernel cannot run here: inputs on several
    devices, a GPU below ``MIN_CAPABILITY``, or a CPU tensor without the interpreter."""
    present = [t for t in tensors if t is not None]
    dev = present[0].device
    if any(t.device != dev for t in present):
        raise ValueError(
            f"{what} (triton): inputs on several devices {[str(t.device) for t in present]}"
        )
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        if cap < MIN_CAPABILITY:
            raise RuntimeError(
                f"{what} (triton): needs compute capability >= {MIN_CAPABILITY}, "
                f"{torch.cuda.get_device_name(dev)} has {cap}; use backend='chunk'"
            )
    elif not INTERPRET:
        raise RuntimeError(
            f"{what} (triton): tensors on {dev} need CUDA or TRITON_INTERPRET=1; "
            "use backend='chunk'"
        )
    bad = [str(t.dtype) for t in present if t.is_floating_point() and t.dtype not in TRITON_DTYPE]
    if bad:
        raise TypeError(
            f"{what} (triton): dtypes {bad} not supported (fp32, bf16, fp16); use backend='chunk'"
        )


def check_slopes(slopes: torch.Tensor, what: str) -> None:
    """Decay slopes must be >= 0: a negative one is a growth rate, exp(+s t), which overflows
    fp32 within a few thousand tokens instead of failing here."""
    if bool((slopes < 0).any()):
        raise ValueError(
            f"{what}: slopes must be >= 0 (decay exp(-s) <= 1), got min {slopes.min().item():.3g}"
        )


def prepare_doc_ids(doc_ids: torch.Tensor | None, like: torch.Tensor, what: str) -> torch.Tensor:
    """Doc ids as contiguous int64 on the kernels' device (moved once per call, not per
    launch), validated non-decreasing along each row (the kernels compare neighbours, so a
    decreasing id would silently join two documents); a one-element dummy when there are none."""
    if doc_ids is None:
        return like.new_zeros(1, dtype=torch.int64)
    docs = doc_ids.to(device=like.device, dtype=torch.int64).contiguous()
    if docs.shape[-1] > 1 and bool((docs[..., 1:] < docs[..., :-1]).any()):
        raise ValueError(f"{what}: doc_ids must be non-decreasing along each row")
    return docs


def on_device(x: torch.Tensor):
    """Launch on the inputs' GPU whatever the current device is (Triton launches on the
    current one)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def device_arch() -> int:
    """The current GPU's compute capability as sm_XY's XY (90 for an H100), 90 without one:
    the target the autotune pruners then assume, as the compile test does."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(torch.cuda.current_device())
        return 10 * major + minor
    return 90


def sm_count() -> int:
    """Streaming multiprocessors of the current GPU (132 without one: an H100 SXM), for the
    wrappers that choose a launch shape by how much of the GPU it fills."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132


def smem_limit() -> int:
    """Shared memory per block of the current GPU (opt-in maximum), else ``SMEM_DEFAULT``."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return getattr(props, "shared_memory_per_block_optin", SMEM_DEFAULT)
    return SMEM_DEFAULT
