"""LASP-2 with per-token log-decays (Mamba-2's dt A) on 2 and 4 gloo ranks equals the float64
single-rank operator: outputs and the gradients of q, k, v and g, with documents crossing rank
borders (one starting exactly at a border, one just after another), per-rank lengths not a
multiple of the block, on the PyTorch pieces and (W=2) on the Triton pieces under the
interpreter. Gradients are compared unscaled. The per-token form adds one float per row and
head to the gathered state, whatever the length."""

import pytest
import torch

from plait.kernels.lightning import lightning_attention
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close
from tests.kernels.conftest import requires_triton
from tests.parallel.test_sequence_parallel import _borders, _docs

SLOPES = [0.0, 0.05]


def _inputs(seed, T, D=8, E=6):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, T, D, generator=gen) * D**-0.5 for _ in range(2))
    v = torch.randn(2, 2, T, E, generator=gen)
    g = -torch.rand(2, 2, T, generator=gen) * 0.5
    do = torch.randn(2, 2, T, E, generator=gen)
    return [q, k, v, g], do


def _run(rt, seed, T, W, use_docs, backend):
    from plait.parallel.lasp2 import lightning_attention_lasp2

    xs, do = _inputs(seed, T)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    C = T // W
    sl = slice(rt.rank * C, (rt.rank + 1) * C)
    leaves = [x[..., sl, :].clone().requires_grad_() for x in xs[:3]]
    leaves.append(xs[3][..., sl].clone().requires_grad_())
    out = lightning_attention_lasp2(
        *leaves[:3], torch.tensor(SLOPES), torch.distributed.group.WORLD,
        doc_ids=None if docs is None else docs[:, sl], block=16, backend=backend, g=leaves[3],
    )
    (out * do[:, :, sl]).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def _check(W, use_docs, backend):
    seed, T = W, 37 * W
    xs, do = _inputs(seed, T)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    ref_leaves = [x.double().requires_grad_() for x in xs]
    ref = lightning_attention(
        *ref_leaves[:3], torch.tensor(SLOPES).double(), doc_ids=docs, backend="naive",
        g=ref_leaves[3],
    )
    (ref * do.double()).sum().backward()
    outs = run_distributed(_run, W, seed, T, W, use_docs, backend)
    assert_rel_close(torch.cat([o for o, _ in outs], 2), ref, 1e-5, "output")
    for i, name in enumerate("qkvg"):
        grad = torch.cat([grads[i] for _, grads in outs], -1 if name == "g" else 2)
        assert_rel_close(grad, ref_leaves[i].grad, 1e-5, f"d{name}")


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("use_docs", [False, True])
def test_lasp2_token_decay_equals_single_rank(W, use_docs):
    _check(W, use_docs, "chunk")


@requires_triton
def test_lasp2_token_decay_on_triton_pieces():
    _check(2, True, "triton")


def _bytes(rt, T, with_g):
    from plait.parallel.collectives import CommCounter
    from plait.parallel.lasp2 import lightning_attention_lasp2

    xs, _ = _inputs(0, T)
    C = T // rt.world_size
    sl = slice(rt.rank * C, (rt.rank + 1) * C)
    with CommCounter().record() as c:
        lightning_attention_lasp2(
            *(x[..., sl, :] for x in xs[:3]), torch.tensor(SLOPES), torch.distributed.group.WORLD,
            block=16, g=xs[3][..., sl] if with_g else None,
        )
    return c.bytes


def test_bytes_do_not_grow_with_the_sequence():
    short, long = (run_distributed(_bytes, 2, T, True)[0] for T in (64, 256))
    plain = run_distributed(_bytes, 2, 64, False)[0]
    assert short == long
    # one [D, E] state and one log-decay per row and head, float32
    assert sum(short.values()) - sum(plain.values()) == 2 * 2 * 4
