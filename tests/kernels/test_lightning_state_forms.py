"""Lightning's two state forms on the Triton path (under the interpreter): the sequential sweep
(one program per state tile and head walks every chunk) and the chunk-parallel form (every
chunk's own contribution at once, then an elementwise carry across chunks), forced with
``PLAIT_LIGHTNING_STATE_FORM``, give the same outputs, final state and gradients (fp32: rel 1e-6
of each other, dg 1e-5; bf16: 1e-2, the storage rounding), with documents that start inside and
on chunk borders, an initial state, per-token decays, T not a multiple of the chunk; LASP-2's
chunk state in both forms too. The wrapper picks the parallel form where the sweep would leave
the GPU idle: at batch 1 and the 1B presets' 8K tokens it launches at least twice an H100's SM
count."""

import pytest
import torch

from plait.kernels.lightning import lightning_attention
from tests.helpers import assert_rel_close
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

pytestmark = requires_triton


def _run(form, monkeypatch, seed, T, dtype, g):
    monkeypatch.setenv("PLAIT_LIGHTNING_STATE_FORM", form)
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, T, 24, generator=gen) * 0.2 for _ in range(2))
    v = torch.randn(1, 2, T, 40, generator=gen)
    s0 = torch.randn(1, 2, 24, 40, generator=gen)
    gg = -torch.rand(1, 2, T, generator=gen) if g else None
    docs = random_doc_ids(1, T, 0.03, seed)
    docs[:, 64:] += 1  # a document starting exactly on a chunk border
    dev = triton_device()
    leaves = [x.to(dev, dtype).requires_grad_() for x in (q, k, v)]
    init = s0.to(dev).requires_grad_()
    gl = gg.to(dev).requires_grad_() if g else None
    o, s = lightning_attention(*leaves, torch.tensor([0.05, 0.3], device=dev),
                               doc_ids=docs.to(dev), initial_state=init, return_state=True,
                               block=16, backend="triton", g=gl)
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed + 9))
    ((o.float() * cot.to(dev)).sum() + s.square().sum()).backward()
    grads = [x.grad.float() for x in leaves] + [init.grad] + ([gl.grad] if g else [])
    return [o.detach().float(), s.detach()] + grads


@pytest.mark.parametrize("seed,g", [(0, False), (1, True)])
@pytest.mark.parametrize("T", [150])
def test_parallel_form_equals_sequential_fp32(monkeypatch, seed, T, g):
    seq = _run("sequential", monkeypatch, seed, T, torch.float32, g)
    par = _run("parallel", monkeypatch, seed, T, torch.float32, g)
    names = ["o", "state", "dq", "dk", "dv", "dinit", "dg"]
    for name, a, b in zip(names, par, seq):
        # dg is a reverse running sum of differences: 1e-5, as against float64
        assert_rel_close(a.cpu(), b.cpu().double(), 1e-5 if name == "dg" else 1e-6, name)


def test_parallel_form_equals_sequential_bf16(monkeypatch):
    seq = _run("sequential", monkeypatch, 2, 150, torch.bfloat16, True)
    par = _run("parallel", monkeypatch, 2, 150, torch.bfloat16, True)
    for a, b in zip(par, seq):
        assert_rel_close(a.cpu(), b.cpu().double(), 1e-2, "bf16")


@pytest.mark.parametrize("g", [False, True])
def test_chunk_state_parallel_form_equals_sequential(monkeypatch, g):
    """LASP-2's chunk state (``WRITE_STATES=False`` or the parallel form's final state):
    the two forms agree (fp32, rel 1e-6); the backward is the same GEMMs for both."""
    from plait.kernels.lightning.triton import lightning_chunk_state_triton

    gen = torch.Generator().manual_seed(3)
    dev = triton_device()
    k = (torch.randn(1, 2, 150, 24, generator=gen) * 0.2).to(dev)
    v = torch.randn(1, 2, 150, 40, generator=gen).to(dev)
    gg = (-torch.rand(1, 2, 150, generator=gen)).to(dev) if g else None
    docs = random_doc_ids(1, 150, 0.03, 3).to(dev)
    out = {}
    for form in ("sequential", "parallel"):
        monkeypatch.setenv("PLAIT_LIGHTNING_STATE_FORM", form)
        out[form] = lightning_chunk_state_triton(k, v, torch.tensor([0.05, 0.3], device=dev),
                                                 docs, block=16, g_BHT=gg)
    assert_rel_close(out["parallel"].cpu(), out["sequential"].cpu().double(), 1e-6, "state")


def test_batch_one_long_context_fills_the_gpu():
    """TransNormerLLM-1B's heads (16 of 128 x 128, bf16) at B=1, T=8192: the sweep runs 64
    programs for an H100's 132 SMs; the parallel form 8,192 for the chunks' states and 512
    for the carry. At B=16 the sweep already fills it and stays."""
    from plait.kernels.lightning.triton import COMBINE_BLOCK, plan, state_form

    meta = plan(128, 128, torch.bfloat16, 64, interpret=False)
    NT, tiles = 8192 // 64, (128 // meta["BK"]) * (128 // meta["BV"])
    assert 16 * tiles == 64
    assert state_form(1, 16, 128, 128, NT, meta) == "parallel"
    assert 16 * tiles * NT >= 2 * 132 and 16 * (128 * 128 // COMBINE_BLOCK) >= 2 * 132
    assert state_form(16, 16, 128, 128, NT, meta) == "sequential"
    assert state_form(1, 16, 128, 128, 2, meta) == "sequential"  # too few chunks
