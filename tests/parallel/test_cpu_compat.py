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


class _Stage(torch.nn.Module):
    def __init__(self, last: bool):
        super().__init__()
        self.lin, self.last = torch.nn.Linear(4, 4), last

    def forward(self, x=None, hidden_BTC=None):
        h = self.lin(hidden_BTC if hidden_BTC is not None else x)
        return h.sum() if self.last else h


def _pipeline_canary(rt, patched: bool):
    """One micro-batch through megatron's 1F1B schedule on two stages of a linear layer."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from plait.parallel.pipeline import StageChunk, transformer_config
    from plait.parallel.stages import Stage

    if not patched:
        cpu_compat.revert()
    last = rt.pp_rank == 1
    stage = Stage(rt.pp_rank, rt.pp_rank + 1, not last, last)
    chunk = StageChunk(_Stage(last), stage, transformer_config(4, 2, 1, 2, 1, 1, None), 0)

    def step(it, model):
        return model(x=next(it)), (lambda o: (o, torch.tensor(1, dtype=torch.int), {}))

    fb = get_forward_backward_func()
    try:
        fb(forward_step_func=step, data_iterator=iter([torch.ones(1, 3, 4)]), model=chunk,
           num_microbatches=1, seq_length=3, micro_batch_size=1)
        return "no error"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_pipeline_schedule_call_sites():
    """Adaptation C: unpatched, the schedule fails on its CUDA tensors; patched, it runs."""
    from plait.parallel.config import ParallelConfig

    pp2 = ParallelConfig(pipeline_parallel=2)
    for r in run_distributed(_pipeline_canary, 2, False, parallel=pp2):
        assert "CUDA" in r or "cuda" in r, f"schedule on CPU unpatched: {r}: revisit adaptation C"
    assert run_distributed(_pipeline_canary, 2, True, parallel=pp2) == ["no error"] * 2
