"""The gated delta rule: the chunked (WY / UT) path, on CPU and with its chunk scan as Triton
kernels (the GPU path, under the interpreter), equals the float64 token recurrence
(outputs, final state, gradients of q, k, v, beta, g and the initial state), with documents,
T not a multiple of the chunk, two seeds; the decode step continues a prefill exactly; and the
recurrence equals the release's own (transformers' qwen3_5 ``torch_recurrent_gated_delta_rule``
and ``torch_chunk_gated_delta_rule``) on the same inputs.

Tolerance: relative Frobenius error 1e-5 for the float32 chunked path against the float64
reference; 1e-10 for float64 against float64; 1e-5 against the release (which runs in float32).
"""

import pytest
import torch

from plait.kernels.gated_delta import (
    gated_delta_recurrent,
    gated_delta_rule,
    gated_delta_step,
    l2_normalize,
)
from tests.helpers import assert_rel_close
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

DECAYS = {"weak": 0.05, "strong": 3.0}


def _inputs(seed, B, H, T, K, V, decay, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (l2_normalize(torch.randn(B, H, T, K, generator=gen)).to(dtype) for _ in range(2))
    v = torch.randn(B, H, T, V, generator=gen, dtype=dtype)
    g = (-torch.rand(B, H, T, generator=gen) * decay).to(dtype)
    beta = torch.rand(B, H, T, generator=gen).to(dtype)
    s0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    do = torch.randn(B, H, T, V, generator=gen, dtype=dtype)
    ds = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return (q, k, v, g, beta, s0), do, ds


def _run(leaves, do, ds, doc_ids, **kw):
    out, state = gated_delta_rule(
        *leaves[:5], doc_ids=doc_ids, initial_state=leaves[5], return_state=True, **kw
    )
    ((out * do).sum() + (state * ds).sum()).backward()
    return out, state


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("decay", list(DECAYS))
def test_chunk_equals_float64_recurrence(seed, T, docs, decay):
    x, do, ds = _inputs(seed, 2, 2, T, 16, 8, DECAYS[decay])
    doc_ids = random_doc_ids(2, T, 0.05, seed) if docs else None
    leaves = [t.clone().requires_grad_() for t in x]
    out, state = _run(leaves, do, ds, doc_ids, block=32)
    ref_leaves = [t.double().requires_grad_() for t in x]
    ref, ref_state = _run(ref_leaves, do.double(), ds.double(), doc_ids, backend="naive")
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert_rel_close(out, ref, 1e-5, "output")
    assert_rel_close(state, ref_state, 1e-5, "final state")
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], leaves, ref_leaves):
        assert_rel_close(a.grad, b.grad, 1e-5, f"d{name}")


@pytest.mark.parametrize("block", [16, 64])
def test_chunk_equals_recurrence_in_float64(block):
    """No float32 rounding hides a wrong term: float64 chunked vs float64 recurrence."""
    x, do, ds = _inputs(3, 1, 3, 100, 8, 8, 1.0, torch.float64)
    doc_ids = torch.tensor([[0] * 16 + [1] * 1 + [2] * 50 + [3] * 33])  # starts at a chunk edge
    a = [t.clone().requires_grad_() for t in x]
    b = [t.clone().requires_grad_() for t in x]
    oa, sa = _run(a, do, ds, doc_ids, block=block)
    ob, sb = _run(b, do, ds, doc_ids, backend="naive")
    assert_rel_close(oa, ob, 1e-10, "output")
    assert_rel_close(sa, sb, 1e-10, "state")
    for name, ga, gb in zip(["q", "k", "v", "g", "beta", "s0"], a, b):
        assert_rel_close(ga.grad, gb.grad, 1e-10, f"d{name}")


def _assert_equals_reference(x, do, ds, doc_ids, out, state, leaves):
    """``out``, ``state`` and the leaves' gradients (a float32 path on inputs ``x``) against
    the float64 recurrence at rel 1e-5."""
    ref_leaves = [t.double().requires_grad_() for t in x]
    ref, ref_state = _run(ref_leaves, do.double(), ds.double(), doc_ids, backend="naive")
    assert_rel_close(out.cpu(), ref, 1e-5, "output")
    assert_rel_close(state.cpu(), ref_state, 1e-5, "final state")
    for name, a, b in zip(["q", "k", "v", "g", "beta", "initial_state"], leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, 1e-5, f"d{name}")


@pytest.mark.parametrize("scan", ["loop", pytest.param("triton", marks=requires_triton)])
def test_groups_of_chunks_carry_the_state(scan):
    """Chunks in groups of 2 (7 chunks: 4 groups, the last of one), documents crossing group
    edges, an initial state: equal to the float64 recurrence."""
    from plait.kernels.gated_delta import gated_delta_chunk

    dev = triton_device() if scan == "triton" else "cpu"
    x, do, ds = _inputs(7, 2, 2, 100, 16, 8, 0.5)
    doc_ids = torch.tensor([[0] * 31 + [1] * 40 + [2] * 29, [3] * 100])
    leaves = [t.clone().to(dev).requires_grad_() for t in x]
    out, state = gated_delta_chunk(*leaves[:5], doc_ids.to(dev), leaves[5], True, block=16,
                                   scan=scan, group=32)
    ((out * do.to(dev)).sum() + (state * ds.to(dev)).sum()).backward()
    _assert_equals_reference(x, do, ds, doc_ids, out, state, leaves)


@requires_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("K,V", [(16, 8), (40, 48)])
def test_triton_path_equals_float64_recurrence(seed, K, V):
    """The GPU path (the chunk scan as Triton kernels; under the CPU interpreter in CI): K and
    V not multiples of the 32-wide tiles (40 x 48: two blocks each, masked), documents, an
    initial state, T not a multiple of the chunk."""
    dev = triton_device()
    x, do, ds = _inputs(seed, 2, 2, 70, K, V, 1.0)
    doc_ids = random_doc_ids(2, 70, 0.05, seed)
    leaves = [t.clone().to(dev).requires_grad_() for t in x]
    out, state = _run(leaves, do.to(dev), ds.to(dev), doc_ids.to(dev), block=16,
                      backend="triton")
    _assert_equals_reference(x, do, ds, doc_ids, out, state, leaves)


def test_documents_restart_the_state():
    """A document equals the same tokens run alone from a zero state; the row's first one
    continues the initial state and the others do not."""
    (q, k, v, g, beta, s0), _, _ = _inputs(4, 1, 2, 90, 8, 8, 0.1)
    doc_ids = torch.tensor([[5] * 30 + [6] * 60])
    out = gated_delta_rule(q, k, v, g, beta, doc_ids=doc_ids, initial_state=s0, block=32)
    sl = slice(30, 90)
    alone = gated_delta_rule(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl])
    first = gated_delta_rule(*(t[:, :, :30] for t in (q, k, v, g, beta)), initial_state=s0)
    assert_rel_close(out[:, :, sl], alone, 1e-6, "second document")
    assert_rel_close(out[:, :, :30], first, 1e-6, "first document")


def test_decode_steps_continue_the_prefill():
    (q, k, v, g, beta, _), _, _ = _inputs(5, 2, 2, 41, 16, 8, 0.5)
    full = gated_delta_rule(q, k, v, g, beta, block=16)
    o, state = gated_delta_rule(
        *(t[:, :, :30] for t in (q, k, v, g, beta)), return_state=True, block=16
    )
    steps = [o]
    for t in range(30, 41):
        o_t, state = gated_delta_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t],
                                      beta[:, :, t], state)
        steps.append(o_t[:, :, None])
    assert_rel_close(torch.cat(steps, 2), full, 1e-5, "decode")


@pytest.mark.parametrize("path", ["recurrent", "chunk"])
def test_equals_the_release(path):
    """transformers' qwen3_5 functions take [B, T, H, D] and normalise q and k themselves."""
    from transformers.models.qwen3_5 import modeling_qwen3_5 as m

    gen = torch.Generator().manual_seed(6)
    B, T, H, K, V = 2, 70, 2, 16, 8
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(B, H, K, V, generator=gen)
    fn = {"recurrent": m.torch_recurrent_gated_delta_rule, "chunk": m.torch_chunk_gated_delta_rule}
    ref, ref_state = fn[path](q, k, v, g, beta, initial_state=s0, output_final_state=True,
                              use_qk_l2norm_in_kernel=True)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out, state = gated_delta_recurrent(
        l2_normalize(t(q)), l2_normalize(t(k)), t(v), t(g), t(beta), None, s0, True
    )
    assert_rel_close(t(out), ref, 1e-5, "output")
    assert_rel_close(state, ref_state, 1e-5, "state")
