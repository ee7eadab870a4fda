"""megatron-core's CPU adaptations, in one place, applied only when CUDA is absent.

Written for and pinned to megatron-core 0.16.1 (``MEGATRON_CORE_VERSION``); ``apply()``
refuses another version, so an upgrade is a conscious act: re-run
tests/parallel/test_cpu_compat.py, whose canary tests assert that each call site patched
here still fails without the patch (and works with it).

What megatron-core 0.16.1 assumes about CUDA, and what is done about it:

A. RNG tracker. ``CudaRNGStatesTracker.add`` / ``fork`` and the activation-recompute
   helpers read and write the CUDA generator (``torch.cuda.get_rng_state``). On CPU the
   tracked states become CPU generator states: ``add`` seeds a private CPU generator, and
   the module's ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` act on the default CPU
   generator, so ``fork()`` swaps the CPU stream exactly as it swaps the CUDA one on a GPU
   (dropout inside tensor-parallel regions draws from the per-TP-rank stream).
B. CUDA-only buffers. The tensor-parallel gathers (``mappings``), the layers' sequence-
   parallel buffers and the global memory buffer (``utils``) allocate on
   ``torch.cuda.current_device()``. Those three modules get a ``torch`` whose
   ``cuda.current_device()`` answers ``"cpu"``; nothing outside them is touched (a global
   patch of torch.cuda would change code that probes for CUDA by catching the error).

C. Pipeline schedules. ``pipeline_parallel.schedules`` counts tokens in a tensor created
   with a hard-coded ``device="cuda"`` (``total_num_tokens``), and ``p2p_communication``
   allocates its receive buffers and shape messages on ``torch.cuda.current_device()`` and
   calls ``torch.cuda.synchronize()`` after batched sends and receives. Those two modules get
   a ``torch`` whose ``cuda.current_device()`` is ``"cpu"``, whose ``cuda.synchronize()`` does
   nothing (gloo's p2p is synchronous once waited on) and whose factories map
   ``device="cuda"`` to the CPU.

Later adaptations (the checkpoint writer's synchronize) join this module with the issues
that need them.
"""

from __future__ import annotations

import contextlib
import types

import torch

MEGATRON_CORE_VERSION = "0.16.1"

_originals: dict[tuple[object, str], object] = {}


class _CpuCudaNamespace(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside the patched megatron modules."""

    def __getattr__(self, name):  # everything but current_device falls through
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"


class _TorchWithCpuDevice(types.ModuleType):
    """A ``torch`` proxy whose ``cuda.current_device()`` is ``"cpu"``."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCudaNamespace()

    def __getattr__(self, name):
        return getattr(torch, name)


class _CpuCudaScheduleNamespace(_CpuCudaNamespace):
    @staticmethod
    def synchronize(device=None):
        return None


def _cpu_device(kwargs: dict) -> dict:
    d = kwargs.get("device")
    if d is not None and torch.device(d).type == "cuda":
        kwargs = {**kwargs, "device": "cpu"}
    return kwargs


class _TorchForSchedules(_TorchWithCpuDevice):
    """The ``torch`` of megatron's schedule and p2p modules on CPU (adaptation C)."""

    _FACTORIES = ("zeros", "ones", "empty", "full", "tensor")

    def __init__(self):
        super().__init__()
        self.cuda = _CpuCudaScheduleNamespace()

    def __getattr__(self, name):
        fn = getattr(torch, name)
        if name in self._FACTORIES:
            return lambda *args, **kwargs: fn(*args, **_cpu_device(kwargs))
        return fn


def _set(obj: object, name: str, value: object) -> None:
    _originals.setdefault((obj, name), getattr(obj, name))
    setattr(obj, name, value)


def _make_cpu_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):
        """megatron's RNG tracker with CPU generator states (adaptation A)."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _get_cpu_rng_state(device=None, clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def is_applied() -> bool:
    return bool(_originals)


def apply(force: bool = False) -> bool:
    """Install the adaptations if CUDA is absent (or ``force``). Returns whether they are on.

    Idempotent. Must run before the RNG tracker is first created (runtime.initialize does).
    """
    if torch.cuda.is_available() and not force:
        return False
    if _originals:
        return True
    import megatron.core
    from megatron.core import utils as mcore_utils
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import layers, mappings
    from megatron.core.tensor_parallel import random as mrandom

    if megatron.core.__version__ != MEGATRON_CORE_VERSION:
        raise RuntimeError(
            f"plait.parallel.cpu_compat was written for megatron-core {MEGATRON_CORE_VERSION}, "
            f"found {megatron.core.__version__}: re-check each call site listed in this module "
            "(tests/parallel/test_cpu_compat.py) before raising the pin"
        )
    # A: RNG tracker on CPU generator states.
    _set(mrandom, "CudaRNGStatesTracker", _make_cpu_tracker_class(mrandom.CudaRNGStatesTracker))
    _set(mrandom, "_get_cuda_rng_state", _get_cpu_rng_state)
    _set(mrandom, "_set_cuda_rng_state", _set_cpu_rng_state)
    mrandom.initialize_rng_tracker(force_reset=True)
    # B: buffers allocated on torch.cuda.current_device().
    proxy = _TorchWithCpuDevice()
    for mod in (mappings, layers, mcore_utils):
        _set(mod, "torch", proxy)
    # C: the pipeline schedules' CUDA tensors and synchronize.
    schedules_torch = _TorchForSchedules()
    for mod in (schedules, p2p_communication):
        _set(mod, "torch", schedules_torch)
    return True


def revert() -> None:
    """Undo ``apply`` (used by the canary tests)."""
    from megatron.core.tensor_parallel import random as mrandom

    for (obj, name), value in _originals.items():
        setattr(obj, name, value)
    _originals.clear()
    mrandom.initialize_rng_tracker(force_reset=True)
