"""LASP-2's chunk-state piece on the Triton state kernel equals the PyTorch form.

``parallel.lasp2.chunk_state`` takes the Triton kernel on CUDA (``backend="triton"`` here,
under the CPU interpreter) and the one-matmul PyTorch form otherwise. The state is what every
rank all-gathers, so an error in it (a decay off by one token, a document boundary not reset)
shifts every later rank's output: outputs and gradients are compared, with documents ending
inside a chunk and exactly at its end, T not a multiple of the block, fp32 and bf16.
"""

import pytest
import torch

from plait.kernels.lightning import lightning_chunk_state
from plait.parallel.lasp2 import chunk_state
from tests.helpers import rel_err
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

pytestmark = requires_triton

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(B, H, T, D, E, dtype, seed, device):
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(B, H, T, D, generator=g) * D**-0.5).to(device=device, dtype=dtype)
    v = torch.randn(B, H, T, E, generator=g).to(device=device, dtype=dtype)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device)
    return k, v, slopes


def _check(k, v, slopes, docs, dtype, seed):
    """Triton (via lasp2.chunk_state) against float64 PyTorch; state and both gradients."""
    kt, vt = (x.detach().clone().requires_grad_() for x in (k, v))
    kr, vr = (x.detach().double().requires_grad_() for x in (k, v))
    out = chunk_state(kt, vt, slopes, docs, backend="triton")
    ref = lightning_chunk_state(kr, vr, slopes.double(), docs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    (out.double() * cot.to(out.device)).sum().backward()
    (ref * cot.to(ref.device)).sum().backward()
    tol = TOL[dtype]
    assert rel_err(out.double(), ref) < tol
    assert rel_err(kt.grad.double(), kr.grad) < tol
    assert rel_err(vt.grad.double(), vr.grad) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("use_docs", [False, True])
@pytest.mark.parametrize("DE", [(16, 16), (20, 12), (64, 64)])
def test_triton_chunk_state_equals_pytorch(dtype, seed, use_docs, DE):
    D, E = DE
    B, H, T = 2, 2, 40  # 40 tokens: three 16-token blocks, the last one masked
    device = triton_device()
    k, v, slopes = _inputs(B, H, T, D, E, dtype, seed, device)
    docs = random_doc_ids(B, T, 0.08, seed).to(device) if use_docs else None
    _check(k, v, slopes, docs, dtype, seed)


def test_document_ending_at_the_chunk_end_and_at_a_block_border():
    """The last document starts exactly at a block border (token 32), and a row that is one
    document: the carry across blocks must be reset in one and kept in the other."""
    device = triton_device()
    k, v, slopes = _inputs(2, 2, 40, 16, 16, torch.float32, 3, device)
    docs = torch.zeros(2, 40, dtype=torch.long)
    docs[0, 32:] = 1
    _check(k, v, slopes, docs.to(device), torch.float32, 3)


def test_cpu_auto_keeps_the_pytorch_path():
    """On CPU tensors ``backend="auto"`` is the PyTorch form, bit for bit (unchanged)."""
    k, v, slopes = _inputs(1, 2, 24, 8, 8, torch.float32, 0, "cpu")
    assert torch.equal(chunk_state(k, v, slopes), lightning_chunk_state(k, v, slopes))
    k64, v64 = k.double(), v.double()  # float64 is not a kernel dtype: PyTorch even if asked
    assert chunk_state(k64, v64, slopes, backend="triton").dtype == torch.float64


def test_wrapper_validation_is_shared():
    """The common guard (kernels/triton_common.py) rejects what every wrapper must."""
    from plait.kernels.lightning.triton import lightning_chunk_state_triton
    from plait.kernels.shortconv.triton import short_conv_triton
    from plait.kernels.swa.triton import swa_triton

    device = triton_device()
    k, v, slopes = _inputs(1, 2, 24, 16, 16, torch.float32, 0, device)
    bad = torch.tensor([[0] * 12 + [1] * 6 + [0] * 6], device=device)
    with pytest.raises(ValueError, match="non-decreasing"):
        lightning_chunk_state_triton(k, v, slopes, bad)
    with pytest.raises(ValueError, match="non-decreasing"):
        swa_triton(k, k, v, 4, bad)
    with pytest.raises(ValueError, match="non-decreasing"):
        short_conv_triton(k[:, 0], torch.randn(16, 3, device=device), None, bad)
    with pytest.raises(ValueError, match="slopes must be >= 0"):
        lightning_chunk_state_triton(k, v, -slopes)
    with pytest.raises(TypeError, match="not supported"):
        lightning_chunk_state_triton(k.double(), v.double(), slopes)
