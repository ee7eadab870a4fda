"""Based linear attention: the feature map reproduces the Taylor kernel exactly, and every
path equals the quadratic reference (outputs and gradients, fp32 vs float64, rel 1e-5)."""

import pytest
import torch

from plait.kernels.based import (
    based_attention,
    based_attention_naive,
    based_attention_step,
    feature_map,
)
from tests.helpers import check_against_reference
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

TOL = 1e-5


def _inputs(seed, B, H, T, f, E):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, f, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, E, generator=g)
    do = torch.randn(B, H, T, E, generator=g)
    return q, k, v, do


@pytest.mark.parametrize("f", [1, 4, 16])
def test_feature_map_is_the_taylor_kernel(f):
    g = torch.Generator().manual_seed(f)
    q, k = (
        torch.randn(50, f, generator=g, dtype=torch.float64),
        torch.randn(50, f, generator=g, dtype=torch.float64),
    )
    phi_q, phi_k = feature_map(q), feature_map(k)
    assert phi_q.shape[-1] == 1 + f + f * (f + 1) // 2  # 153 for f = 16
    s = (q * k).sum(-1) / f**0.5
    torch.testing.assert_close((phi_q * phi_k).sum(-1), 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)


def _compare(backend, seed, T, f, E, docs, device="cpu", B=2, H=2, block=64):
    q, k, v, do = _inputs(seed, B, H, T, f, E)
    doc_ids = random_doc_ids(B, T, 0.03, seed) if docs else None
    dev_docs = None if doc_ids is None else doc_ids.to(device)
    # eps=0: with eps > 0 a lone token's dq is eps-sized (ill-conditioned to compare relatively);
    # the denominator is >= 1/2 per attended token, so eps is never needed for safety here.
    check_against_reference(
        lambda q, k, v: based_attention(
            q, k, v, doc_ids=dev_docs, backend=backend, block=block, eps=0.0
        ),
        lambda q, k, v: based_attention_naive(q, k, v, doc_ids, eps=0.0),
        (q, k, v), do, "qkv", TOL, device,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("f,E", [(16, 16), (8, 24)])
@pytest.mark.parametrize("docs", [False, True])
def test_chunk_matches_reference(seed, T, f, E, docs):
    _compare("chunk", seed, T, f, E, docs)


@requires_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 130])
@pytest.mark.parametrize("docs", [False, True])
def test_triton_matches_reference(seed, T, docs):
    _compare("triton", seed, T, 4, 8, docs, device=triton_device(), B=1, H=1, block=32)


def test_packed_equals_one_by_one():
    q, k, v, _ = _inputs(3, 1, 2, 60, 8, 8)
    cu = torch.tensor([0, 25, 26, 60])
    packed = based_attention(q, k, v, cu_seqlens=cu)
    for a, b in [(0, 25), (25, 26), (26, 60)]:
        alone = based_attention_naive(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-5, atol=1e-5)


def test_prefill_then_steps_equal_full_forward():
    q, k, v, _ = _inputs(4, 2, 2, 50, 8, 8)
    full = based_attention(q, k, v)
    y, state = based_attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], return_state=True)
    outs = [y]
    for t in range(20, 50):
        y_t, state = based_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        outs.append(y_t[:, :, None])
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-5, atol=1e-5)


@requires_triton
def test_triton_preset_feature_width():
    """The presets' feature width (f = 16: 153 features, tiled 5 x 32) with value dim 64 + 1."""
    _compare("triton", 5, 40, 16, 64, True, device=triton_device(), B=1, H=1, block=16)
