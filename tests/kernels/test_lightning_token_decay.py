"""Lightning attention with per-token log-decays ``g`` (Mamba-2's dt A): every path equals the
float64 quadratic reference -- outputs, final state, and the gradients of q, k, v, the initial
state and g -- with and without documents, strong and weak decays, two seeds, T not a multiple
of the block. The token recurrence is a second reference; decode steps continue a prefill;
LASP-2's chunk state on the Triton kernel equals the PyTorch form, dg included.

Tolerance: relative Frobenius error 1e-5 for the fp32 paths (dg is a reverse running sum of
differences, measured at most 3e-6).
"""

import pytest
import torch

from plait.kernels.lightning import (
    lightning_attention,
    lightning_attention_naive,
    lightning_attention_recurrent,
    lightning_attention_step,
    lightning_chunk_state,
)
from tests.helpers import assert_rel_close
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

TOL = 1e-5
# log-decay per token drawn from [-scale, 0]; "strong" forgets within a few tokens
SCALES = {"weak": 0.05, "strong": 3.0}


def _inputs(seed, B, H, T, D, E, scale, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=gen, dtype=dtype) * D**-0.5 for _ in range(2))
    v = torch.randn(B, H, T, E, generator=gen, dtype=dtype)
    s0 = torch.randn(B, H, D, E, generator=gen, dtype=dtype)
    g = -torch.rand(B, H, T, generator=gen, dtype=dtype) * scale
    do = torch.randn(B, H, T, E, generator=gen, dtype=dtype)
    ds = torch.randn(B, H, D, E, generator=gen, dtype=dtype)
    return [q, k, v, s0, g], do, ds


def _compare(backend, seed, T, scale, D, E, docs, block, device="cpu", B=2):
    leaves0, do, ds = _inputs(seed, B, 2, T, D, E, SCALES[scale])
    slopes = torch.tensor([0.0, 0.1])
    doc_ids = random_doc_ids(B, T, 0.04, seed) if docs else None
    leaves = [t.clone().to(device).requires_grad_() for t in leaves0]
    out, state = lightning_attention(
        *leaves[:3], slopes.to(device), doc_ids=None if doc_ids is None else doc_ids.to(device),
        initial_state=leaves[3], return_state=True, block=block, backend=backend, g=leaves[4],
    )
    ((out * do.to(device)).sum() + (state * ds.to(device)).sum()).backward()
    ref_leaves = [t.double().requires_grad_() for t in leaves0]
    ref, ref_state = lightning_attention_naive(
        *ref_leaves[:3], slopes.double(), doc_ids, ref_leaves[3], True, g_BHT=ref_leaves[4]
    )
    ((ref * do.double()).sum() + (ref_state * ds.double()).sum()).backward()
    assert out.dtype == torch.float32
    assert_rel_close(out.cpu(), ref, TOL, "output")
    assert_rel_close(state.cpu(), ref_state, TOL, "final state")
    for name, a, b in zip(["q", "k", "v", "initial_state", "g"], leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, TOL, f"d{name}")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("docs", [False, True])
def test_chunk_matches_reference(seed, T, scale, docs):
    _compare("chunk", seed, T, scale, 16, 8, docs, block=16)


@requires_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T,block", [(1, 16), (37, 16), (150, 32)])
@pytest.mark.parametrize("docs", [False, True])
def test_triton_matches_reference(seed, T, block, docs):
    _compare("triton", seed, T, "strong", 16, 8, docs, block, device=triton_device(), B=1)


@requires_triton
def test_triton_head_dims_not_powers_of_two():
    _compare("triton", 3, 40, "weak", 24, 40, True, block=16, device=triton_device(), B=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_reference_equals_recurrence(seed):
    (q, k, v, s0, g), _, _ = _inputs(seed, 2, 2, 40, 8, 4, 1.0, torch.float64)
    slopes = torch.tensor([0.0, 0.3], dtype=torch.float64)
    docs = random_doc_ids(2, 40, 0.1, seed)
    a, sa = lightning_attention_naive(q, k, v, slopes, docs, s0, True, g_BHT=g)
    b, sb = lightning_attention_recurrent(q, k, v, slopes, docs, s0, True, g_BHT=g)
    assert_rel_close(a, b, 1e-12, "naive vs recurrent")
    assert_rel_close(sa, sb, 1e-12, "final states")


def test_constant_g_is_the_slope():
    """g = -s everywhere with zero slopes is the constant-slope operator (float64)."""
    (q, k, v, s0, _), _, _ = _inputs(2, 1, 2, 50, 8, 8, 1.0, torch.float64)
    slopes = torch.tensor([0.2, 1.5], dtype=torch.float64)
    g = (-slopes)[None, :, None].expand(1, 2, 50).contiguous()
    a, sa = lightning_attention(q, k, v, slopes, initial_state=s0, return_state=True, block=16)
    b, sb = lightning_attention(
        q, k, v, torch.zeros(2, dtype=torch.float64), initial_state=s0, return_state=True,
        block=16, g=g,
    )
    assert_rel_close(b, a, 1e-12, "output")
    assert_rel_close(sb, sa, 1e-12, "state")


@pytest.mark.parametrize("T_prefill", [1, 37])
def test_prefill_then_steps_equal_full_forward(T_prefill):
    (q, k, v, _, g), _, _ = _inputs(5, 2, 2, 60, 16, 8, 1.0)
    slopes = torch.tensor([0.0, 0.2])
    full = lightning_attention(q, k, v, slopes, g=g)
    p = slice(0, T_prefill)
    out, state = lightning_attention(
        q[:, :, p], k[:, :, p], v[:, :, p], slopes, return_state=True, g=g[:, :, p]
    )
    outs = [out]
    for t in range(T_prefill, 60):
        o, state = lightning_attention_step(
            q[:, :, t], k[:, :, t], v[:, :, t], slopes, state, g_BH=g[:, :, t]
        )
        outs.append(o[:, :, None])
    torch.testing.assert_close(torch.cat(outs, dim=2), full, rtol=1e-5, atol=1e-5)


def _chunk_state_case(backend, seed, docs, device="cpu"):
    (_, k, v, _, g), _, _ = _inputs(seed, 2, 2, 40, 20, 12, 1.0)
    slopes = torch.tensor([0.0, 0.1])
    doc_ids = random_doc_ids(2, 40, 0.08, seed) if docs else None
    leaves = [x.clone().to(device).requires_grad_() for x in (k, v, g)]
    from plait.parallel.lasp2 import chunk_state

    out = chunk_state(
        leaves[0], leaves[1], slopes.to(device),
        None if doc_ids is None else doc_ids.to(device), backend=backend, g=leaves[2],
    )
    ref_leaves = [x.double().requires_grad_() for x in (k, v, g)]
    ref = lightning_chunk_state(ref_leaves[0], ref_leaves[1], slopes.double(), doc_ids,
                                g=ref_leaves[2])
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    (out.double() * cot.to(out.device)).sum().backward()
    (ref * cot).sum().backward()
    assert_rel_close(out.cpu(), ref, TOL, "chunk state")
    for name, a, b in zip("kvg", leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, TOL, f"d{name}")
    # and the PyTorch form itself against the naive final state (zero start)
    zero_q = torch.zeros(2, 2, 40, 20, dtype=torch.float64)
    _, fin = lightning_attention_naive(zero_q, k.double(), v.double(), slopes.double(), doc_ids,
                                       None, True, g_BHT=g.double())
    assert_rel_close(ref.detach(), fin, 1e-12, "chunk state vs naive final state")


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("backend", ["chunk", pytest.param("triton", marks=requires_triton)])
def test_chunk_state_with_token_decay(backend, docs):
    device = triton_device() if backend == "triton" else "cpu"
    _chunk_state_case(backend, 4, docs, device)


def test_g_shape_is_named():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="g shape"):
        lightning_attention(q, q, q, torch.zeros(2), g=torch.zeros(1, 2, 4))
