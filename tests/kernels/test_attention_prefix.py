"""kernels/attention/prefix.py: queries that see a whole prefix of keys and their own keys
causally, against a float64 dense-mask reference written here. Every backend (the CPU flash
merge, the bottom-right causal bias that is LASP-2H's CUDA path, run here through its CPU
fallback, and the naive mask), fp32, outputs and the gradients of q, k, v; prefix lengths 0,
1 and 37 and query lengths 1 and 29 (no block multiples), two seeds, value width != key
width where the backend allows it (the CPU flash operator needs them equal). Tolerance 1e-5
relative (fp32 against float64)."""

import pytest
import torch

from plait.kernels.attention.prefix import _flash, prefix_causal_attention
from tests.helpers import assert_rel_close

TOL = 1e-5


def _reference(q, k, v, scale):
    """Scores with the bottom-right causal mask, softmax, in float64."""
    L, S = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.arange(S)[None, :] <= S - L + torch.arange(L)[:, None]
    return s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _inputs(seed, P, L, D=16, E=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, L, D, generator=g)
    k = torch.randn(2, 3, P + L, D, generator=g)
    v = torch.randn(2, 3, P + L, E, generator=g)
    do = torch.randn(2, 3, L, E, generator=g)
    return q, k, v, do


@pytest.mark.parametrize("backend", ["flash_cpu", "lower_right", "naive"])
@pytest.mark.parametrize("P,L", [(0, 29), (1, 29), (37, 29), (37, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_causal_equals_reference(backend, P, L, seed):
    q, k, v, do = _inputs(seed, P, L, E=16 if backend == "flash_cpu" else 8)
    scale = 0.3
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = prefix_causal_attention(*leaves, scale=scale, backend=backend)
    (out * do).sum().backward()
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_leaves, scale)
    (ref * do.double()).sum().backward()
    assert_rel_close(out, ref, TOL, "output")
    for name, a, b in zip("qkv", leaves, ref_leaves, strict=True):
        assert_rel_close(a.grad, b.grad, TOL, f"d{name}")


def test_auto_takes_the_flash_merge_on_cpu(monkeypatch):
    from plait.kernels.attention import prefix

    calls = []
    monkeypatch.setattr(prefix._PrefixCausal, "apply", lambda *a: calls.append(a) or a[0])
    q, k, v, _ = _inputs(0, 5, 7, E=16)
    prefix.prefix_causal_attention(q, k, v)
    assert len(calls) == 1


def test_cpu_flash_operator_canary():
    """The private operator the CPU path calls: (q, k, v, dropout, is_causal, scale=) ->
    (output, row log-sum-exp [B, H, L] in float32). A torch upgrade that changes it fails
    here, not inside LASP-2H."""
    q, k, v, _ = _inputs(3, 0, 11, E=16)
    out, lse = _flash(q, k, v, 0.0, True, scale=0.25)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    s = s.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
    assert_rel_close(out, s.softmax(-1) @ v.double(), TOL, "output")
    assert_rel_close(lse, s.logsumexp(-1), TOL, "log-sum-exp")


def test_bad_shapes_and_backend_are_named():
    q, k, v, _ = _inputs(0, 0, 9)
    with pytest.raises(ValueError, match="expected k, v"):
        prefix_causal_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="backend 'cuda'"):
        prefix_causal_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="values as wide as the keys"):
        prefix_causal_attention(q, k, v, backend="flash_cpu")
