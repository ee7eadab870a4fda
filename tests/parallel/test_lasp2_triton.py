"""LASP-2 on the Triton pieces (what CUDA runs): on 2 gloo ranks under the CPU interpreter,
``backend="triton"`` (the Triton chunk-state kernel for the gathered states and the Triton
lightning kernel for the local part) equals the single-rank float64 reference, outputs and
gradients, with documents crossing the rank border, 37 tokens per rank (not a multiple of the
16-token block), lightning's decay and Based's augmented values."""

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import assert_rel_close
from tests.kernels.conftest import requires_triton
from tests.parallel.test_sequence_parallel import _borders, _docs, _inputs, _reference

pytestmark = requires_triton


def _run(rt, op, seed, T, W, slopes):
    from plait.parallel.lasp2 import based_attention_lasp2, lightning_attention_lasp2

    group = torch.distributed.group.WORLD
    r, C = rt.rank, T // W
    q, k, v, do = _inputs(seed, 2, 2, T, 16)
    docs = _docs(2, T, seed, _borders(T, W))
    sl = slice(r * C, (r + 1) * C)
    leaves = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
    if op == "lasp2":
        out = lightning_attention_lasp2(*leaves, slopes, group, doc_ids=docs[:, sl], block=16,
                                        backend="triton")
    else:
        out = based_attention_lasp2(*leaves, group, doc_ids=docs[:, sl], block=16, eps=0.0,
                                    backend="triton")
    (out * do[:, :, sl]).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("op", ["lasp2", "based"])
def test_lasp2_on_triton_pieces_equals_single_rank(op):
    W, seed = 2, 0
    T = 37 * W
    slopes = torch.tensor([0.05, 0.7])
    ref_out, ref_grads = _reference(op, seed, T, True, W, slopes)
    outs = run_distributed(_run, W, op, seed, T, W, slopes)
    out = torch.cat([o for o, _ in outs], dim=2)
    assert_rel_close(out, ref_out, 1e-5, f"{op} output")
    for i, name in enumerate("qkv"):
        g = torch.cat([grads[i] for _, grads in outs], dim=2)
        assert_rel_close(g, ref_grads[i], 1e-5, f"{op} d{name}")
