"""Sliding-window Triton kernels skip key/query blocks across document boundaries.

Correctness alone cannot show a block was skipped (a visited block that the mask zeroes adds
nothing), so the other documents' tensors are poisoned with NaN: a visited block multiplies
its zero probabilities by NaN values and the NaN reaches the output. Outputs and gradients of
the clean document must stay finite and equal the reference. Plus the usual comparison with
short documents in a long window (where skipping changes the loop bounds most), fp32 and
bf16, T not a multiple of the block, two seeds.
"""

import pytest
import torch

from plait.kernels.swa import swa, swa_naive
from plait.kernels.swa.triton import doc_bounds
from tests.helpers import assert_rel_close
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

pytestmark = requires_triton


def test_doc_bounds():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 5, 5], [3, 3, 3, 3, 3, 3, 3, 3]])
    start, end = doc_bounds(docs, 8)
    assert start.tolist() == [[0, 0, 0, 3, 3, 5, 6, 6], [0] * 8]
    assert end.tolist() == [[2, 2, 2, 4, 4, 5, 7, 7], [7] * 8]


def _grads(leaves, docs, window, do, backend):
    out = swa(*leaves, window, doc_ids=docs, backend=backend, block=16)
    (out.float() * do).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the poisoned rows
@pytest.mark.parametrize("poison", ["earlier", "later"])
def test_blocks_of_other_documents_are_not_visited(poison):
    """Documents [0, 32) and [32, 90): block-aligned at 16, a window covering both. Poisoning
    the earlier document's K, V shows the forward and dQ loops start at the document start;
    poisoning the later document's Q, dO shows the dK/dV loop stops at the document end."""
    device = triton_device()
    T, D, window = 90, 16, 128
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, T, D, generator=g) for _ in range(4))
    docs = torch.tensor([[0] * 32 + [1] * (T - 32)])
    clean = slice(32, T) if poison == "earlier" else slice(0, 32)
    bad = slice(0, 32) if poison == "earlier" else slice(32, T)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = swa_naive(*ref_leaves, window, docs)
    (ref * do.double()).sum().backward()
    names = ("k", "v") if poison == "earlier" else ("q",)
    for name, t in zip("qkv", (q, k, v)):
        if name in names:
            t[:, :, bad] = float("nan")
    if poison == "later":
        do[:, :, bad] = float("nan")
    leaves = [t.to(device).requires_grad_() for t in (q, k, v)]
    out, grads = _grads(leaves, docs.to(device), window, do.to(device), "triton")
    assert torch.isfinite(out[:, :, clean]).all()
    assert_rel_close(out[:, :, clean].cpu(), ref[:, :, clean].detach(), 1e-5, "output")
    for name, a, b in zip("qkv", grads, ref_leaves):
        assert torch.isfinite(a[:, :, clean]).all(), f"d{name} touched the other document"
        assert_rel_close(a[:, :, clean].cpu(), b.grad[:, :, clean], 1e-5, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("D", [16, 64])
def test_short_documents_in_a_long_window(dtype, seed, D):
    """Documents of ~10 tokens, a 60-token window, T = 75 (not a multiple of 16)."""
    device = triton_device()
    T, window = 75, 60
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(2, 2, T, D, generator=g).to(dtype) for _ in range(4))
    docs = random_doc_ids(2, T, 0.1, seed)
    leaves = [t.clone().to(device).requires_grad_() for t in (q, k, v)]
    out, grads = _grads(leaves, docs.to(device), window, do.float().to(device), "triton")
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = swa_naive(*ref_leaves, window, docs)
    (ref * do.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_rel_close(out.cpu().double(), ref.detach(), tol, "output")
    for name, a, b in zip("qkv", grads, ref_leaves):
        assert_rel_close(a.cpu().double(), b.grad, tol, f"d{name}")
