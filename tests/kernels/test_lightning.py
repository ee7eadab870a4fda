"""Lightning attention: every path equals the float64 quadratic reference (outputs, final
state, and gradients of q, k, v and the initial state), with and without documents.

Tolerance: relative Frobenius error 1e-5 for fp32 paths against the float64 reference.
"""

import pytest
import torch

from plait.kernels.docs import cu_seqlens_from_doc_ids
from plait.kernels.lightning import (
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_recurrent,
    lightning_attention_step,
)
from tests.helpers import assert_rel_close
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

TOL = 1e-5
SLOPES = {"no_decay": [0.0, 0.0], "mixed": [0.0, 0.05], "strong": [2.0, 8.0]}


def _inputs(seed, B, H, T, D, E, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g, dtype=dtype) * D**-0.5 for _ in range(2))
    v = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, D, E, generator=g, dtype=dtype)
    do = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    ds = torch.randn(B, H, D, E, generator=g, dtype=dtype)
    return q, k, v, s0, do, ds


def _compare(backend, seed, T, decay, D, E, docs, block, device="cpu", B=2):
    q, k, v, s0, do, ds = _inputs(seed, B, 2, T, D, E)
    slopes = torch.tensor(SLOPES[decay])
    doc_ids = random_doc_ids(B, T, 0.03, seed) if docs else None
    leaves = [t.detach().clone().to(device).requires_grad_() for t in (q, k, v, s0)]
    out, state = lightning_attention(
        *leaves[:3], slopes.to(device), doc_ids=None if doc_ids is None else doc_ids.to(device),
        initial_state=leaves[3], return_state=True, block=block, backend=backend,
    )
    ((out * do.to(device)).sum() + (state * ds.to(device)).sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, s0)]
    ref, ref_state = lightning_attention_naive(
        *ref_leaves[:3], slopes.double(), doc_ids, ref_leaves[3], return_state=True
    )
    ((ref * do.double()).sum() + (ref_state * ds.double()).sum()).backward()
    assert out.dtype == torch.float32
    assert_rel_close(out.cpu(), ref, TOL, "output")
    assert_rel_close(state.cpu(), ref_state, TOL, "final state")
    for name, a, b in zip(["q", "k", "v", "initial_state"], leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, TOL, f"d{name}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("decay", list(SLOPES))
@pytest.mark.parametrize("D,E", [(16, 16), (32, 8)])
@pytest.mark.parametrize("docs", [False, True])
def test_chunk_matches_reference(seed, T, decay, D, E, docs):
    _compare("chunk", seed, T, decay, D, E, docs, block=64)


@requires_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T,block", [(1, 16), (63, 16), (64, 32), (257, 64)])
@pytest.mark.parametrize("decay", ["mixed", "strong"])
@pytest.mark.parametrize("docs", [False, True])
def test_triton_matches_reference(seed, T, block, decay, docs):
    _compare("triton", seed, T, decay, 16, 8, docs, block=block, device=triton_device(), B=1)


@requires_triton
def test_triton_head_dims_not_powers_of_two():
    _compare("triton", 3, 40, "mixed", 24, 40, True, block=16, device=triton_device(), B=1)


@pytest.mark.parametrize("block,group", [(1, 1), (7, 14), (16, 16), (64, 1024)])
def test_block_and_group_do_not_change_result(block, group):
    from plait.kernels.lightning.chunk import lightning_attention_chunk

    q, k, v, s0, _, _ = _inputs(3, 1, 2, 50, 8, 8, torch.float64)
    slopes = torch.tensor([0.3, 0.01], dtype=torch.float64)
    docs = random_doc_ids(1, 50, 0.1, 3)
    ref = lightning_attention_naive(q, k, v, slopes, docs, s0)
    out = lightning_attention_chunk(q, k, v, slopes, docs, s0, block=block, group=group)
    assert_rel_close(out, ref, 1e-12, "out")


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_reference_equals_recurrence(seed):
    q, k, v, s0, _, _ = _inputs(seed, 2, 2, 40, 8, 4, torch.float64)
    slopes = torch.tensor([0.0, 0.7], dtype=torch.float64)
    docs = random_doc_ids(2, 40, 0.1, seed)
    a, sa = lightning_attention_naive(q, k, v, slopes, docs, s0, return_state=True)
    b, sb = lightning_attention_recurrent(q, k, v, slopes, docs, s0, return_state=True)
    assert_rel_close(a, b, 1e-12, "naive vs recurrent")
    assert_rel_close(sa, sb, 1e-12, "final states")


@pytest.mark.parametrize("backend", ["chunk", pytest.param("triton", marks=requires_triton)])
def test_packed_documents_equal_documents_one_by_one(backend):
    device = triton_device() if backend == "triton" else "cpu"
    q, k, v, _, _, _ = _inputs(4, 1, 2, 90, 16, 16)
    slopes = torch.tensor([0.0, 0.2])
    lengths = [17, 1, 40, 32]
    cu = torch.tensor([0, 17, 18, 58, 90])
    packed = lightning_attention(
        q.to(device), k.to(device), v.to(device), slopes.to(device), cu_seqlens=cu.to(device),
        block=16, backend=backend,
    ).cpu()
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        alone = lightning_attention_naive(q[:, :, sl], k[:, :, sl], v[:, :, sl], slopes)
        torch.testing.assert_close(packed[:, :, sl], alone, rtol=1e-5, atol=1e-5)
        start += n


@pytest.mark.parametrize("T_prefill", [1, 37, 64])
def test_prefill_then_steps_equal_full_forward(T_prefill):
    q, k, v, _, _, _ = _inputs(5, 2, 2, 80, 16, 8)
    slopes = torch.tensor([0.05, 1.5])
    full = lightning_attention(q, k, v, slopes)
    out, state = lightning_attention(
        q[:, :, :T_prefill], k[:, :, :T_prefill], v[:, :, :T_prefill], slopes, return_state=True
    )
    outs = [out]
    for t in range(T_prefill, 80):
        o, state = lightning_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], slopes, state)
        outs.append(o[:, :, None])
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)


def test_known_value():
    """One head, one dim: o_t = sum_j lambda^(t-j) q_t k_j v_j, written out by hand."""
    q = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    k = torch.tensor([1.0, 1.0, 1.0]).view(1, 1, 3, 1)
    v = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1)
    lam = 0.5
    slopes = torch.tensor([-torch.log(torch.tensor(lam)).item()])
    expected = torch.tensor([1.0, 2 * (lam + 10), 3 * (lam**2 + 10 * lam + 100)]).view(1, 1, 3, 1)
    torch.testing.assert_close(lightning_attention(q, k, v, slopes), expected, rtol=1e-6, atol=0)
    # a document starting at token 2 forgets the first two
    docs = torch.tensor([[0, 0, 1]])
    torch.testing.assert_close(
        lightning_attention(q, k, v, slopes, doc_ids=docs)[0, 0, :, 0],
        torch.tensor([1.0, 2 * (lam + 10), 300.0]),
    )


def test_causal():
    q, k, v, _, _, _ = _inputs(5, 1, 2, 70, 8, 8)
    slopes = torch.tensor([0.0, 0.1])
    out = lightning_attention(q, k, v, slopes)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] += 1.0
    v2[:, :, 40:] -= 1.0
    out2 = lightning_attention(q, k2, v2, slopes)
    torch.testing.assert_close(out2[:, :, :40], out[:, :, :40], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, 40:], out[:, :, 40:])


def test_bad_inputs_are_named():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="slopes shape"):
        lightning_attention(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="expected q, k"):
        lightning_attention(q, q[:, :1], q, torch.zeros(2))
    with pytest.raises(ValueError, match="initial_state shape"):
        lightning_attention(q, q, q, torch.zeros(2), initial_state=torch.zeros(1, 2, 3, 4))
    with pytest.raises(ValueError, match="backend 'cuda'"):
        lightning_attention(q, q, q, torch.zeros(2), backend="cuda")


def test_cu_seqlens_round_trip_and_errors():
    from plait.kernels.docs import doc_ids_from_cu_seqlens

    docs = random_doc_ids(3, 20, 0.2, 0)
    cu = cu_seqlens_from_doc_ids(docs)
    again = doc_ids_from_cu_seqlens(cu, 3, 20)
    assert torch.equal(cu_seqlens_from_doc_ids(again), cu)
    assert (again[:, 1:] == again[:, :-1]).eq(docs[:, 1:] == docs[:, :-1]).all()
    with pytest.raises(ValueError, match="end at B\\*T=40"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 10, 30]), 2, 20)
    with pytest.raises(ValueError, match="documents may not span two rows"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 10, 30, 40]), 2, 20)
    with pytest.raises(ValueError, match="strictly increasing"):
        doc_ids_from_cu_seqlens(torch.tensor([0, 10, 10, 20]), 1, 20)


@requires_triton
@pytest.mark.parametrize("D,E", [(64, 64), (128, 128)])
def test_triton_preset_head_dims(D, E):
    """The preset head dims, several state tiles per head (64 x 64 in bf16, 32 x 32 in fp32)."""
    _compare("triton", 6, 70, "mixed", D, E, True, block=32, device=triton_device(), B=1)


# bf16 against the float64 reference of the same (bf16-rounded) inputs: outputs and gradients
# are stored in bf16 (relative rounding 2^-9), the rest runs in fp32. Tolerance 1e-2.
BF16_TOL = 1e-2


@requires_triton
@pytest.mark.parametrize("D,E", [(64, 64), (128, 128)])
@pytest.mark.parametrize("docs", [False, True])
def test_triton_bf16(D, E, docs):
    device = triton_device()
    q, k, v, s0, do, ds = (x.bfloat16() for x in _inputs(7, 1, 2, 48, D, E))
    slopes = torch.tensor(SLOPES["mixed"])
    doc_ids = random_doc_ids(1, 48, 0.05, 7) if docs else None
    leaves = [t.detach().clone().to(device).requires_grad_() for t in (q, k, v)]
    s0_leaf = s0.float().to(device).requires_grad_()
    out, state = lightning_attention(
        *leaves, slopes.to(device), doc_ids=None if doc_ids is None else doc_ids.to(device),
        initial_state=s0_leaf, return_state=True, block=16, backend="triton",
    )
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    ((out.float() * do.float().to(device)).sum() + (state * ds.float().to(device)).sum()).backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, s0)]
    ref, ref_state = lightning_attention_naive(
        *ref_leaves[:3], slopes.double(), doc_ids, ref_leaves[3], return_state=True
    )
    ((ref * do.double()).sum() + (ref_state * ds.double()).sum()).backward()
    assert_rel_close(out.cpu(), ref, BF16_TOL, "output")
    assert_rel_close(state.cpu(), ref_state, 1e-5, "final state (fp32)")
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert a.grad.dtype == torch.bfloat16
        assert_rel_close(a.grad.cpu(), b.grad, BF16_TOL, f"d{name}")
    assert_rel_close(s0_leaf.grad.cpu(), ref_leaves[3].grad, 1e-5, "dinitial_state")


@requires_triton
def test_triton_skips_gradients_not_needed():
    device = triton_device()
    q, k, v, _, _, _ = _inputs(8, 1, 2, 40, 16, 16)
    q = q.to(device).requires_grad_()
    k, v = k.to(device), v.to(device)
    out = lightning_attention(q, k, v, torch.tensor([0.1, 0.2]).to(device), backend="triton")
    out.sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None
    ref = lightning_attention(q.detach().cpu(), k.cpu(), v.cpu(), torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(out.detach().cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["chunk", pytest.param("triton", marks=requires_triton)])
def test_invalid_slopes_and_doc_ids_are_refused(backend):
    device = triton_device() if backend == "triton" else "cpu"
    q = torch.zeros(1, 2, 6, 4, device=device)
    with pytest.raises(ValueError, match="slopes must be >= 0"):
        lightning_attention(q, q, q, torch.tensor([0.1, -0.1], device=device), backend=backend)
    docs = torch.tensor([[0, 0, 1, 1, 0, 0]], device=device)
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_attention(q, q, q, torch.zeros(2, device=device), doc_ids=docs, backend=backend)
