"""LASP-2H's per-document path (no [C, W*C] mask) equals the dense-mask single-rank
reference in the layouts that exercise each piece: no documents, one document across every
rank (the earlier-keys merge on every rank), documents starting exactly at a rank border
and inside chunks, rows of a batch with different boundaries; per-rank lengths that are
not multiples of anything. fp32 against float64, outputs and the gradients of q, k, v. The
CUDA form of the earlier-keys piece (SDPA with a bottom-right causal bias) runs here through
its CPU fallback, in the layouts where it is used."""

import pytest
import torch
import torch.nn.functional as F

from plait.kernels.attention import causal_attention_naive
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close
from tests.parallel.test_sequence_parallel import _inputs

TOL = 1e-5


def _layout(kind: str, B: int, T: int, W: int) -> torch.Tensor | None:
    C = T // W
    if kind == "none":
        return None
    docs = torch.zeros(B, T, dtype=torch.long)
    if kind == "one":
        return docs
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[0, [3, C, C + 1, 2 * C - 1, T - 2]] = True  # at, after and before borders
    starts[1, [5, C + 4]] = True
    return starts.long().cumsum(1)


def _run(rt, seed, T, kind, W, backend="auto"):
    from plait.parallel import lasp2h

    masked = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kw):
        masked.append(attn_mask is not None)
        # the real function while it runs: a CausalBias mask dispatches back to it by identity
        lasp2h.F.scaled_dot_product_attention = real_sdpa
        try:
            return real_sdpa(*args, attn_mask=attn_mask, **kw)
        finally:
            lasp2h.F.scaled_dot_product_attention = spy

    lasp2h.F.scaled_dot_product_attention = spy
    try:
        C, r = T // W, rt.rank
        q, k, v, do = _inputs(seed, 2, 2, T, 16)
        docs = _layout(kind, 2, T, W)
        sl = slice(r * C, (r + 1) * C)
        leaves = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
        out = lasp2h.attention_lasp2h(
            *leaves,
            torch.distributed.group.WORLD,
            doc_ids=docs[:, sl] if docs is not None else None,
            prefix_backend=backend,
        )
        (out * do[:, :, sl]).sum().backward()
    finally:
        lasp2h.F.scaled_dot_product_attention = real_sdpa
    return out.detach(), [x.grad for x in leaves], any(masked)


def _reference(seed, T, kind, W):
    q, k, v, do = _inputs(seed, 2, 2, T, 16)
    docs = _layout(kind, 2, T, W)
    leaves = [x.clone().double().requires_grad_() for x in (q, k, v)]
    out = causal_attention_naive(*leaves, docs)
    (out * do.double()).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("kind", ["none", "one", "many"])
@pytest.mark.parametrize("seed", [0, 1])
def test_lasp2h_per_document_equals_reference(W, kind, seed):
    T = 29 * W
    ref_out, ref_grads = _reference(seed, T, kind, W)
    outs = run_distributed(_run, W, seed, T, kind, W)
    assert not any(m for _, _, m in outs), "a masked SDPA call on the CPU path"
    assert_rel_close(torch.cat([o for o, _, _ in outs], 2), ref_out, TOL, "output")
    for i, name in enumerate("qkv"):
        g = torch.cat([grads[i] for _, grads, _ in outs], 2)
        assert_rel_close(g, ref_grads[i], TOL, f"d{name}")


@pytest.mark.parametrize("kind", ["none", "many"])
def test_lasp2h_cuda_prefix_form_equals_reference(kind):
    """``prefix_backend="lower_right"``: what the CUDA path runs for the document begun on an
    earlier rank."""
    W, T = 4, 29 * 4
    ref_out, ref_grads = _reference(0, T, kind, W)
    outs = run_distributed(_run, W, 0, T, kind, W, "lower_right")
    assert any(m for _, _, m in outs[1:]), "the bottom-right causal bias was not used"
    assert_rel_close(torch.cat([o for o, _, _ in outs], 2), ref_out, TOL, "output")
    for i, name in enumerate("qkv"):
        g = torch.cat([grads[i] for _, grads, _ in outs], 2)
        assert_rel_close(g, ref_grads[i], TOL, f"d{name}")
