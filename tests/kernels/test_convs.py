"""Short depthwise and long (FFT) causal convolutions, and H3's SSM kernels: every path equals
the direct-sum reference (outputs and gradients, fp32 vs float64, rel 1e-5); the FFT path with
an SSM kernel equals that SSM's recurrence; packed documents equal documents one by one."""

import pytest
import torch

from plait.kernels.longconv import (
    diag_ssm_kernel,
    diag_ssm_step,
    long_conv,
    long_conv_naive,
    shift_ssm_kernel,
    shift_ssm_step,
)
from plait.kernels.shortconv import short_conv, short_conv_naive, short_conv_step
from tests.helpers import assert_rel_close, check_against_reference, rel_err
from tests.kernels.conftest import random_doc_ids, requires_triton, triton_device

TOL = 1e-5


def _short(backend, seed, T, K, docs, device="cpu", B=2, C=24):
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    w, b = torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    doc_ids = random_doc_ids(B, T, 0.05, seed) if docs else None
    dev_docs = None if doc_ids is None else doc_ids.to(device)
    check_against_reference(
        lambda x, w, b: short_conv(x, w, b, doc_ids=dev_docs, backend=backend),
        lambda x, w, b: short_conv_naive(x, w, b, doc_ids),
        (x, w, b), dy, ["x", "w", "bias"], TOL, device,
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("docs", [False, True])
def test_short_conv_chunk(seed, T, K, docs):
    _short("chunk", seed, T, K, docs)


@requires_triton
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 100])
@pytest.mark.parametrize("docs", [False, True])
def test_short_conv_triton(seed, T, docs):
    _short("triton", seed, T, 4, docs, device=triton_device(), C=40)


def test_short_conv_matches_torch_conv1d():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 30, 8, generator=g), torch.randn(8, 4, generator=g)
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3, bias=False)
    conv.weight.data = w[:, None, :]
    expected = conv(x.transpose(1, 2))[..., :30].transpose(1, 2)
    torch.testing.assert_close(short_conv_naive(x, w), expected, rtol=1e-5, atol=1e-6)


def test_short_conv_steps_equal_full():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 20, 8, generator=g), torch.randn(8, 3, generator=g), torch.randn(8)
    full = short_conv(x, w, b)
    state, outs = None, []
    for t in range(20):
        y, state = short_conv_step(x[:, t], w, b, state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("T", [1, 63, 64, 257, 1000])
@pytest.mark.parametrize("L", ["T", "short"])
@pytest.mark.parametrize("docs", [False, True])
def test_long_conv_fft(seed, T, L, docs):
    g = torch.Generator().manual_seed(seed)
    B, C = 2, 3
    u, dy = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    k = torch.randn(C, T if L == "T" else 7, generator=g) / T**0.5
    doc_ids = random_doc_ids(B, T, 0.02, seed) if docs else None
    leaves = [t.detach().clone().requires_grad_() for t in (u, k)]
    y = long_conv(*leaves, doc_ids=doc_ids)
    (y * dy).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in (u, k)]
    ref = long_conv(*ref_leaves, doc_ids=doc_ids, backend="naive")
    (ref * dy.double()).sum().backward()
    assert_rel_close(y, ref, TOL, "output")
    for name, a, r in zip(["u", "k"], leaves, ref_leaves):
        assert_rel_close(a.grad, r.grad, TOL, f"d{name}")


def test_long_conv_packed_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    u, k = torch.randn(1, 40, 2, generator=g), torch.randn(2, 40, generator=g)
    packed = long_conv(u, k, cu_seqlens=torch.tensor([0, 13, 14, 40]))
    for a, b in [(0, 13), (13, 14), (14, 40)]:
        alone = long_conv_naive(u[:, a:b], k[:, : b - a])
        torch.testing.assert_close(packed[:, a:b], alone, rtol=1e-5, atol=1e-5)


def _diag_params(C=3, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    log_dt = torch.randn(C, **f64) * 0.5 - 2
    A = torch.complex(-torch.rand(C, S, **f64) - 0.1, torch.randn(C, S, **f64) * 3)
    Cc = torch.complex(torch.randn(C, S, **f64), torch.randn(C, S, **f64))
    return log_dt, A, Cc


@pytest.mark.parametrize("method", ["bilinear", "zoh"])
@pytest.mark.parametrize("seed", [0, 1])
def test_diag_ssm_fft_equals_recurrence(seed, method):
    log_dt, A, Cc = _diag_params(seed=seed)
    u = torch.randn(2, 70, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = long_conv(u, diag_ssm_kernel(log_dt, A, Cc, 70, method))
    state, outs = None, []
    for t in range(70):
        y_t, state = diag_ssm_step(u[:, t], log_dt, A, Cc, state, method)
        outs.append(y_t)
    assert_rel_close(y, torch.stack(outs, 1), 1e-12, "diag SSM")


def _closed_form(log_dt, A, Cc, L, method):
    """k[l] = 2 Re sum_s C_s B_bar_s A_bar_s^l with A_bar, B_bar written out (B = 1):
    bilinear (H3's released S4D kernel): A_bar = (1 + dt A/2) / (1 - dt A/2),
    B_bar = dt / (1 - dt A/2); ZOH: A_bar = exp(dt A), B_bar = (exp(dt A) - 1) / A. Powers by
    repeated multiplication, not by exp(l log A_bar) as the kernel does."""
    dt = log_dt.exp()[:, None]
    if method == "bilinear":
        A_bar, B_bar = (1 + dt * A / 2) / (1 - dt * A / 2), dt / (1 - dt * A / 2)
    else:
        A_bar, B_bar = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A
    out, power = [], torch.ones_like(A_bar)
    for _ in range(L):
        out.append(2 * (Cc * B_bar * power).sum(-1).real)
        power = power * A_bar
    return torch.stack(out, -1)


@pytest.mark.parametrize("seed", [0, 1])
def test_diag_ssm_kernel_equals_closed_forms(seed):
    """Both discretisations against their closed forms (float64), over 300 lags; at H3's init
    range (dt up to 0.1) the two differ by far more than rounding, so the option matters."""
    log_dt, A, Cc = _diag_params(seed=seed)
    for method in ("bilinear", "zoh"):
        k = diag_ssm_kernel(log_dt, A, Cc, 300, method)
        assert_rel_close(k, _closed_form(log_dt, A, Cc, 300, method), 1e-10, method)
    zoh = _closed_form(log_dt, A, Cc, 300, "zoh")
    assert rel_err(diag_ssm_kernel(log_dt, A, Cc, 300), zoh) > 1e-3


def test_shift_ssm_fft_equals_recurrence():
    g = torch.Generator().manual_seed(0)
    C_shift = torch.randn(3, 8, dtype=torch.float64, generator=g)
    u = torch.randn(2, 30, 3, dtype=torch.float64, generator=g)
    y = long_conv(u, shift_ssm_kernel(C_shift, 30))
    state, outs = None, []
    for t in range(30):
        y_t, state = shift_ssm_step(u[:, t], C_shift, state)
        outs.append(y_t)
    assert_rel_close(y, torch.stack(outs, 1), 1e-12, "shift SSM")


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="expected x \\[B,T,C\\], w \\[C,K\\]"):
        short_conv(torch.zeros(1, 4, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="expected u \\[B,T,C\\], k \\[C,L\\]"):
        long_conv(torch.zeros(1, 4, 3), torch.zeros(2, 3))


def test_short_conv_packed_equals_one_by_one():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(1, 30, 6, generator=g), torch.randn(6, 4, generator=g)
    packed = short_conv(x, w, cu_seqlens=torch.tensor([0, 2, 3, 30]))
    for a, b in [(0, 2), (2, 3), (3, 30)]:
        torch.testing.assert_close(
            packed[:, a:b], short_conv_naive(x[:, a:b], w), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("L", [1, 255, 256, 700])
def test_vandermonde_chunks_equal_one_shot(complex_, L):
    """The chunked, checkpointed Vandermonde product (SSM and EMA kernels) equals the
    materialised [C, S, L] einsum: values and gradients of w and log z."""
    from plait.kernels.longconv import vandermonde

    g = torch.Generator().manual_seed(L)
    C, S = 5, 7
    if complex_:
        w = torch.complex(torch.randn(C, S, generator=g), torch.randn(C, S, generator=g))
        logz = torch.complex(-torch.rand(C, S, generator=g) * 0.05, torch.randn(C, S, generator=g))
    else:
        w = torch.randn(C, S, generator=g)
        logz = -torch.rand(C, S, generator=g) * 0.05
    w64, logz64 = (
        w.to(torch.complex128 if complex_ else torch.float64),
        logz.to(torch.complex128 if complex_ else torch.float64),
    )
    grad_out = torch.randn(C, L, generator=g, dtype=torch.float64)
    outs = []
    for fn in (
        lambda a, b: vandermonde(a, b, L, chunk=256),
        lambda a, b: torch.einsum(
            "cs,csl->cl", a, torch.exp(b[..., None] * torch.arange(L, dtype=torch.float64))
        ),
    ):
        a, b = w64.clone().requires_grad_(), logz64.clone().requires_grad_()
        k = fn(a, b)
        (k.real * grad_out).sum().backward()
        outs.append((k.detach(), a.grad, b.grad))
    for x, y in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@requires_triton
@pytest.mark.parametrize("docs", [False, True])
def test_short_conv_triton_dw_across_spans(monkeypatch, docs):
    """dw accumulates over several T-tiles per program and several spans per row."""
    import plait.kernels.shortconv.triton as sc

    monkeypatch.setattr(sc, "SPAN", 64)
    _short("triton", 3, 200, 3, docs, device=triton_device(), C=40)


@requires_triton
def test_short_conv_triton_bf16():
    """bf16 storage, fp32 arithmetic: tolerance 1e-2 against float64 on the rounded inputs."""
    device = triton_device()
    g = torch.Generator().manual_seed(4)
    x, dy = (torch.randn(2, 90, 40, generator=g).bfloat16() for _ in range(2))
    w = torch.randn(40, 4, generator=g).bfloat16()
    leaves = [t.clone().to(device).requires_grad_() for t in (x, w)]
    y = short_conv(*leaves, backend="triton")
    (y.float() * dy.float().to(device)).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (x, w)]
    ref = short_conv_naive(*ref_leaves)
    (ref * dy.double()).sum().backward()
    assert_rel_close(y.cpu(), ref, 1e-2, "y")
    for name, a, b in zip(["x", "w"], leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, 1e-2, f"d{name}")
