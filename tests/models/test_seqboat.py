"""SeqBoat's layer against a dense reference: full-length attention with a [T, T] mask that
encodes the compression (window counted in active tokens), so gathering, chunking and
scattering are all checked; the router forced on/off; gradients reaching the router."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig

from plait.models.common import ModelConfig
from plait.models.common.layers import apply_rotary, rotary_cos_sin
from plait.models.seqboat.mixer import SeqBoat
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

T = 37  # not a multiple of the window
ATTENTION = ("w_z", "qk_gamma", "qk_beta", "w_v.weight", "w_r.weight", "w_h.weight")


def _restart(d):
    out = torch.zeros_like(d)
    for t in range(1, len(d)):
        out[t] = 0 if d[t] != d[t - 1] else out[t - 1] + 1
    return out


def _inputs(seed, docs: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, T, 32, generator=g)
    doc_ids = torch.zeros(2, T, dtype=torch.long)
    if docs:
        doc_ids[0, 15:] = 1
        doc_ids[1, 8:] = 1
        doc_ids[1, 30:] = 2
    pos = torch.stack([_restart(doc_ids[b]) for b in range(2)])
    return x, pos, (doc_ids if docs else None)


def reference(m: SeqBoat, x, pos, docs):
    """Dense and unfused: every token computed, the attention restricted by a mask."""
    mx = F.silu(m.ema(x, docs, SequenceParallel()))
    hx, _ = m.w_hx(mx)
    mask, g = m.gates(mx)
    z = F.silu(mx @ m.w_z.t())
    q, k = z * m.qk_gamma[0] + m.qk_beta[0], z * m.qk_gamma[1] + m.qk_beta[1]
    cos, sin = rotary_cos_sin(pos, q.shape[-1], m.rope_theta)
    q, k = apply_rotary(q[:, None], cos, sin)[:, 0], apply_rotary(k[:, None], cos, sin)[:, 0]
    v = F.silu(m.w_v(x)[0])
    r = F.silu(m.w_r(mx)[0])
    c = mask.long().cumsum(1) - 1  # compressed index of each active token
    w = m.window
    ci, cj = c[:, :, None], c[:, None, :]
    allowed = (cj <= ci) & (cj >= (ci // w - 1) * w) & mask[:, None, :] & mask[:, :, None]
    if docs is not None:
        allowed &= docs[:, None, :] == docs[:, :, None]
    scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    h, _ = m.w_h(r * (p @ v))
    return F.silu(hx + g[..., None] * h * mask[..., None])


def _layer(router: str, window: int) -> SeqBoat:
    cfg = ModelConfig(pattern="S", num_layers=1, hidden_size=32, num_heads=1)
    cfg.seqboat.zdim, cfg.seqboat.window, cfg.seqboat.router = 8, window, router
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = SeqBoat(cfg, mp, 0, SequenceParallel())
    if router == "learned":  # a router that sends roughly half the tokens to the GAU
        with torch.no_grad():
            m.w_router.normal_(0, 1.0)
    return m


def _fwd_bwd(m, fn, x, pos, docs):
    m.zero_grad()
    xi = x.clone().requires_grad_()
    y = fn(xi, pos, docs)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad.clone(), grads


def _compare(rt, router, seed, docs, window):
    m = _layer(router, window)
    x, pos, doc_ids = _inputs(seed, docs)
    fast = _fwd_bwd(m, m, x, pos, doc_ids)
    ref = _fwd_bwd(m, lambda *a: reference(m, *a), x, pos, doc_ids)
    mask, _ = m.gates(F.silu(m.ema(x, doc_ids, SequenceParallel())))
    return fast, ref, mask.float().mean().item()


@pytest.mark.parametrize("router", ["on", "learned"])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("seed,window", [(0, 5), (1, 8)])
def test_matches_dense_reference(router, docs, seed, window):
    """All-on equals dense local GAU attention; with a learned router the compressed path
    equals the dense masked one. Outputs, input and parameter gradients, rel 1e-5."""
    fast, ref, active = run_distributed(_compare, 1, router, seed, docs, window)[0]
    if router == "learned":
        assert 0.2 < active < 0.8, f"router sent {active:.2f} of tokens: test would be weak"
    else:
        assert active == 1.0
    assert_rel_close(fast[0], ref[0], 1e-5, "output")
    assert_rel_close(fast[1], ref[1], 1e-5, "dx")
    assert fast[2].keys() == ref[2].keys()
    for k, g in ref[2].items():
        assert_rel_close(fast[2][k], g, 1e-5, k)


def _off(rt):
    m = _layer("off", 5)
    x, pos, _ = _inputs(0, False)
    y, _, grads = _fwd_bwd(m, m, x, pos, None)
    hx, _ = m.w_hx(F.silu(m.ema(x, None, SequenceParallel())))
    return y, F.silu(hx).detach(), grads


def test_router_all_off_attention_contributes_nothing():
    y, silu_hx, grads = run_distributed(_off, 1)[0]
    torch.testing.assert_close(y, silu_hx, rtol=0, atol=0)
    for name in ATTENTION:
        assert name not in grads or grads[name].abs().max() == 0, name
    assert grads["w_hx.weight"].abs().max() > 0  # the rest of the layer still learns


def test_gradients_reach_the_router():
    fast, _, _ = run_distributed(_compare, 1, "learned", 0, False, 5)[0]
    grads = fast[2]
    assert grads["w_router"].abs().max() > 1e-6
    assert grads["log_tau"].abs() > 1e-8
