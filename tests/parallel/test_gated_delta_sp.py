"""The gated delta rule's sequence-parallel form (parallel/gated_delta.py) on 2 and 4 gloo
ranks equals the float64 single-rank recurrence: outputs and the gradients of q, k, v, g and
beta, with documents crossing rank borders (one starting exactly at a border, one just after
another), per-rank lengths not a multiple of the chunk. Gradients are compared unscaled. The
bytes one layer all-gathers do not depend on the sequence length."""

import pytest
import torch

from plait.kernels.gated_delta import gated_delta_rule, l2_normalize
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close
from tests.parallel.test_sequence_parallel import _borders, _docs

K, V = 8, 6


def _inputs(seed, T):
    gen = torch.Generator().manual_seed(seed)
    q, k = (l2_normalize(torch.randn(2, 2, T, K, generator=gen)) for _ in range(2))
    v = torch.randn(2, 2, T, V, generator=gen)
    g = -torch.rand(2, 2, T, generator=gen) * 0.3
    beta = torch.rand(2, 2, T, generator=gen)
    do = torch.randn(2, 2, T, V, generator=gen)
    return [q, k, v, g, beta], do


def _run(rt, seed, T, W, use_docs):
    from plait.parallel.gated_delta import gated_delta_sp

    xs, do = _inputs(seed, T)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    C = T // W
    sl = slice(rt.rank * C, (rt.rank + 1) * C)
    leaves = [x[:, :, sl].clone().requires_grad_() for x in xs]
    out = gated_delta_sp(*leaves, torch.distributed.group.WORLD,
                         doc_ids=None if docs is None else docs[:, sl], block=16)
    (out * do[:, :, sl]).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("use_docs", [False, True])
def test_gated_delta_sp_equals_single_rank(W, use_docs):
    seed, T = W, 37 * W
    xs, do = _inputs(seed, T)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    ref_leaves = [x.double().requires_grad_() for x in xs]
    ref = gated_delta_rule(*ref_leaves, doc_ids=docs, backend="naive")
    (ref * do.double()).sum().backward()
    outs = run_distributed(_run, W, seed, T, W, use_docs)
    assert_rel_close(torch.cat([o for o, _ in outs], 2), ref, 1e-5, "output")
    for i, name in enumerate(["q", "k", "v", "g", "beta"]):
        grad = torch.cat([grads[i] for _, grads in outs], 2)
        assert_rel_close(grad, ref_leaves[i].grad, 1e-5, f"d{name}")


def _bytes(rt, T):
    from plait.parallel.collectives import CommCounter
    from plait.parallel.gated_delta import gated_delta_sp

    xs, _ = _inputs(0, T)
    C = T // rt.world_size
    sl = slice(rt.rank * C, (rt.rank + 1) * C)
    with CommCounter().record() as c:
        gated_delta_sp(*(x[:, :, sl] for x in xs), torch.distributed.group.WORLD, block=16)
    return c.bytes


def test_bytes_do_not_grow_with_the_sequence():
    short, long = (run_distributed(_bytes, 2, T)[0] for T in (64, 256))
    # the [K, V + K] pair per head and row, float32 (doc-less: no border ids gathered)
    assert short == long and sum(short.values()) == 2 * 2 * K * (V + K) * 4
