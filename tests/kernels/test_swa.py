"""Sliding-window attention: blocked PyTorch, CPU-flash and Triton paths equal the masked T x T
softmax reference (outputs and gradients, fp32 vs float64, rel 1e-5)."""

import pytest
import torch

from plait.kernels.swa import swa, swa_naive
from tests.helpers import assert_rel_close, check_against_reference
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

TOL = 1e-5


def _compare(backend, seed, T, window, D, E, docs, device="cpu", B=2, H=2, block=64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    v, do = (torch.randn(B, H, T, E, generator=g) for _ in range(2))
    doc_ids = random_doc_ids(B, T, 0.03, seed) if docs else None
    dev_docs = None if doc_ids is None else doc_ids.to(device)
    check_against_reference(
        lambda q, k, v: swa(q, k, v, window, doc_ids=dev_docs, backend=backend, block=block),
        lambda q, k, v: swa_naive(q, k, v, window, doc_ids),
        (q, k, v), do, "qkv", TOL, device,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("window", [1, 16, 100])
@pytest.mark.parametrize("docs", [False, True])
def test_chunk_matches_reference(seed, T, window, docs):
    _compare("chunk", seed, T, window, 16, 8, docs)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("window", [2, 3, 16, 65, 100])
@pytest.mark.parametrize("docs", [False, True])
def test_flash_cpu_matches_reference(seed, T, window, docs):
    """Blocks of window - 1 (1, 2, 15, 64, 99 tokens): lengths that are and are not multiples
    of them, documents shorter than a block and spanning several."""
    _compare("flash_cpu", seed, T, window, 16, 16, docs)


def test_auto_takes_the_flash_path_on_cpu_where_it_applies(monkeypatch):
    from plait.kernels import swa as swa_mod

    used = []
    monkeypatch.setattr(swa_mod, "swa_flash_cpu", lambda *a: used.append("flash") or a[0])
    monkeypatch.setattr(swa_mod, "swa_chunk", lambda *a: used.append("chunk") or a[0])
    q = torch.randn(1, 2, 10, 8)
    swa(q, q, q, 4)
    swa(q, q, q, 1)  # window 1: a query sees only itself
    swa(q, q, q[..., :4], 4)  # values narrower than keys
    assert used == ["flash", "chunk", "chunk"]


@requires_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T,window", [(1, 4), (63, 5), (64, 16), (130, 40)])
@pytest.mark.parametrize("docs", [False, True])
def test_triton_matches_reference(seed, T, window, docs):
    _compare("triton", seed, T, window, 16, 24, docs, device=triton_device(), B=1, block=16)


def test_window_covering_everything_is_causal_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(swa(q, k, v, 40), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(swa(q, k, v, 1000), full, rtol=1e-5, atol=1e-6)


def test_packed_equals_one_by_one():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 50, 8, generator=g) for _ in range(3))
    packed = swa(q, k, v, 8, cu_seqlens=torch.tensor([0, 9, 10, 50]))
    for a, b in [(0, 9), (9, 10), (10, 50)]:
        alone = swa_naive(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 8)
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-5, atol=1e-6)


def test_bad_window_is_named():
    q = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        swa(q, q, q, 0)


@requires_triton
@pytest.mark.parametrize("D", [64, 128])
def test_triton_preset_head_dims(D):
    _compare("triton", 2, 70, 20, D, D, True, device=triton_device(), B=1, H=1, block=32)


@requires_triton
@pytest.mark.parametrize("D", [64, 128])
def test_triton_bf16(D):
    """bf16 inputs against the float64 reference of the same rounded inputs; outputs and
    gradients are stored in bf16 (rounding 2^-9). Tolerance 1e-2."""
    device = triton_device()
    g = torch.Generator().manual_seed(D)
    q, k, v, do = (torch.randn(1, 2, 50, D, generator=g).bfloat16() for _ in range(4))
    docs = random_doc_ids(1, 50, 0.05, D)
    leaves = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
    out = swa(*leaves, 17, doc_ids=docs.to(device), backend="triton", block=16)
    assert out.dtype == torch.bfloat16
    (out.float() * do.float().to(device)).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = swa_naive(*ref_leaves, 17, docs)
    (ref * do.double()).sum().backward()
    assert_rel_close(out.cpu(), ref, 1e-2, "output")
    for name, a, b in zip("qkv", leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, 1e-2, f"d{name}")


@requires_triton
def test_triton_refuses_decreasing_doc_ids():
    device = triton_device()
    q = torch.zeros(1, 1, 4, 16, device=device)
    with pytest.raises(ValueError, match="non-decreasing"):
        swa(q, q, q, 2, doc_ids=torch.tensor([[1, 1, 0, 0]], device=device), backend="triton")
