"""Lightning attention: chunked path == quadratic reference == recurrence; outputs and grads.

Tolerance: relative error (Frobenius) 1e-5 in fp32; the references are computed in float64.
"""

import pytest
import torch

from plait.kernels.lightning import (
    lightning_attention,
    lightning_attention_chunk,
    lightning_attention_naive,
    lightning_attention_recurrent,
)
from tests.helpers import assert_rel_close

TOL = 1e-5


def _inputs(seed, B, H, T, D, E, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g, dtype=dtype) * D**-0.5 for _ in range(2))
    v = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    do = torch.randn(B, H, T, E, generator=g, dtype=dtype)
    return q, k, v, do


SLOPES = {
    "no_decay": [0.0, 0.0],
    "mixed": [0.0, 0.05],
    "strong": [2.0, 8.0],  # lambda^64 underflows to 0: the state must not blow up
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("decay", list(SLOPES))
@pytest.mark.parametrize("D,E", [(16, 16), (32, 8)])
def test_chunk_matches_reference(seed, T, decay, D, E):
    q, k, v, do = _inputs(seed, 2, 2, T, D, E)
    slopes = torch.tensor(SLOPES[decay])
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = lightning_attention_chunk(*leaves, slopes, block=64)
    out.backward(do)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = lightning_attention_naive(*ref_leaves, slopes.double())
    ref.backward(do.double())
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, TOL, "output")
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert_rel_close(a.grad, b.grad, TOL, f"d{name}")


@pytest.mark.parametrize("block", [1, 7, 16, 64])
def test_block_size_does_not_change_result(block):
    q, k, v, _ = _inputs(3, 1, 2, 50, 8, 8, torch.float64)
    slopes = torch.tensor([0.3, 0.01], dtype=torch.float64)
    ref = lightning_attention_naive(q, k, v, slopes)
    assert_rel_close(lightning_attention_chunk(q, k, v, slopes, block=block), ref, 1e-12, "out")


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_reference_equals_recurrence(seed):
    q, k, v, _ = _inputs(seed, 1, 2, 40, 8, 4, torch.float64)
    slopes = torch.tensor([0.0, 0.7], dtype=torch.float64)
    assert_rel_close(
        lightning_attention_naive(q, k, v, slopes),
        lightning_attention_recurrent(q, k, v, slopes),
        1e-12,
        "naive vs recurrent",
    )


def test_known_value():
    """One head, one dim: o_t = sum_j lambda^(t-j) q_t k_j v_j, written out by hand."""
    q = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    k = torch.tensor([1.0, 1.0, 1.0]).view(1, 1, 3, 1)
    v = torch.tensor([1.0, 10.0, 100.0]).view(1, 1, 3, 1)
    lam = 0.5
    slopes = torch.tensor([-torch.log(torch.tensor(lam)).item()])
    expected = torch.tensor([1.0, 2 * (lam + 10), 3 * (lam**2 + 10 * lam + 100)]).view(1, 1, 3, 1)
    torch.testing.assert_close(lightning_attention(q, k, v, slopes), expected, rtol=1e-6, atol=0)


def test_causal():
    q, k, v, _ = _inputs(5, 1, 2, 70, 8, 8)
    slopes = torch.tensor([0.0, 0.1])
    out = lightning_attention(q, k, v, slopes)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] += 1.0
    v2[:, :, 40:] -= 1.0
    out2 = lightning_attention(q, k2, v2, slopes)
    torch.testing.assert_close(out2[:, :, :40], out[:, :, :40], rtol=0, atol=0)
    assert not torch.allclose(out2[:, :, 40:], out[:, :, 40:])


def test_bad_shapes_are_named():
    q = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match="slopes shape"):
        lightning_attention(q, q, q, torch.zeros(3))
    with pytest.raises(ValueError, match="expected q, k"):
        lightning_attention(q, q[:, :1], q, torch.zeros(2))
