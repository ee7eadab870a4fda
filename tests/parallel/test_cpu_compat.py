"""The megatron-core CPU adaptations: each call site fails unpatched (canary) and works patched.

If megatron-core is upgraded and a canary stops failing, the adaptation may no longer be
needed (or the call site moved): re-read plait/parallel/cpu_compat.py before raising the pin.
"""

import pytest
import torch

from plait.parallel import cpu_compat
from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only adaptations")


def _seed_tracker():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tensor_parallel.model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    return a, b


def _gather_first_dim():
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    x = torch.full((2, 3), float(ps.get_tensor_model_parallel_rank()))
    return gather_from_sequence_parallel_region(x)


def _canary(rt):
    from megatron.core.tensor_parallel import random as mrandom

    from plait.parallel.config import ParallelConfig  # noqa: F401  (import check only)

    out = {}
    for name, fn in (("rng", _seed_tracker), ("buffer", _gather_first_dim)):
        try:
            fn()
            out[name] = "no error"
        except Exception as e:  # the unpatched call sites raise on a CPU-only torch
            out[name] = f"{type(e).__name__}: {e}"
    mrandom.initialize_rng_tracker(force_reset=True)
    return out


def _patched(rt):
    assert cpu_compat.is_applied()
    torch.manual_seed(0)
    a, b = _seed_tracker()
    default_before = torch.get_rng_state()
    a2, b2 = _seed_tracker()
    return {
        "fork_reproducible": torch.equal(a, a2) and torch.equal(b, b2),
        "fork_advances": not torch.equal(a, b),
        "default_untouched": torch.equal(default_before, torch.get_rng_state()),
        "draw": a,
        "gathered": _gather_first_dim(),
    }


def test_unpatched_call_sites_still_fail():
    from plait.parallel.config import ParallelConfig

    res = run_distributed(_canary, 2, raw=True, parallel=ParallelConfig(tensor_parallel=2))
    for r in res:
        assert "CUDA" in r["rng"], f"RNG tracker on CPU: {r['rng']}: revisit adaptation A"
        assert "CUDA" in r["buffer"], f"TP gather on CPU: {r['buffer']}: revisit adaptation B"


def test_patched_call_sites_work():
    from plait.parallel.config import ParallelConfig

    res = run_distributed(_patched, 2, parallel=ParallelConfig(tensor_parallel=2))
    for r in res:
        assert r["fork_reproducible"] and r["fork_advances"] and r["default_untouched"]
        torch.testing.assert_close(
            r["gathered"], torch.tensor([[0.0] * 3, [0.0] * 3, [1.0] * 3, [1.0] * 3])
        )
    # Each TP rank draws from its own stream inside fork() (seed + 2718 + tp_rank).
    assert not torch.equal(res[0]["draw"], res[1]["draw"])


def test_version_pin_is_enforced(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    was = cpu_compat.is_applied()
    if was:
        pytest.skip("already applied in this process")
    with pytest.raises(RuntimeError, match="written for megatron-core 0.16.1"):
        cpu_compat.apply()
    assert not cpu_compat.is_applied()
