"""LASP-2 (lightning) and LASP-2H (softmax) on 2 and 4 gloo ranks equal the single-rank
operator: outputs and the gradients of q, k, v, with decay, with documents crossing rank
borders, with per-rank lengths that are not multiples of the block size. Gradients are
compared unscaled: an implementation that inflated them by the group size would fail."""

import pytest
import torch

from plait.kernels.attention import causal_attention_naive
from plait.kernels.lightning import lightning_attention
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

TOL = 1e-5


def _inputs(seed, B, H, T, D):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    return q * D**-0.5, k * D**-0.5, v, do


def _docs(B, T, seed, borders):
    """Documents of random lengths, plus starts exactly at the given token positions."""
    g = torch.Generator().manual_seed(seed + 100)
    starts = torch.rand(B, T, generator=g) < 0.04
    starts[:, borders] = True
    starts[:, 0] = False
    return starts.long().cumsum(1) + 1000 * torch.arange(B)[:, None]


def _borders(T, W):
    """A document starting exactly at the first rank border, another just after the second."""
    C = T // W
    return [C, min(2 * C + 3, T - 1)]


def _run_sp(rt, op, seed, T, use_docs, W, slopes):
    from megatron.core import parallel_state as ps

    from plait.parallel.lasp2 import lightning_attention_lasp2
    from plait.parallel.lasp2h import attention_lasp2h

    group = torch.distributed.group.WORLD  # the whole world is the SP group in these tests
    r, C = rt.rank, T // W
    q, k, v, do = _inputs(seed, 2, 2, T, 16)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    sl = slice(r * C, (r + 1) * C)
    leaves = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
    local_docs = docs[:, sl] if docs is not None else None
    if op == "lasp2":
        out = lightning_attention_lasp2(*leaves, slopes, group, doc_ids=local_docs, block=16)
    elif op == "based":
        from plait.parallel.lasp2 import based_attention_lasp2

        out = based_attention_lasp2(*leaves, group, doc_ids=local_docs, block=16, eps=0.0)
    elif op == "lasp2_bidir":
        out = lightning_attention_lasp2(*leaves, torch.zeros(2), group, causal=False)
    else:
        out = attention_lasp2h(*leaves, group, doc_ids=local_docs)
    (out * do[:, :, sl]).sum().backward()
    del ps
    return out.detach(), [x.grad for x in leaves]


def _reference(op, seed, T, use_docs, W, slopes):
    q, k, v, do = _inputs(seed, 2, 2, T, 16)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    leaves = [x.clone().double().requires_grad_() for x in (q, k, v)]
    if op == "lasp2":
        out = lightning_attention(*leaves, slopes.double(), doc_ids=docs, backend="naive")
    elif op == "based":
        from plait.kernels.based import based_attention_naive

        out = based_attention_naive(*leaves, docs, eps=0.0)
    elif op == "lasp2_bidir":
        s = leaves[0] @ (leaves[1].transpose(-1, -2) @ leaves[2])
        out = s
    else:
        out = causal_attention_naive(*leaves, docs)
    (out * do.double()).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("op", ["lasp2", "based", "lasp2h"])
@pytest.mark.parametrize("use_docs", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_parallel_equals_single_rank(W, op, use_docs, seed):
    T = 37 * W  # 37 tokens per rank: not a multiple of the block (16)
    slopes = torch.tensor([0.05, 0.7])
    ref_out, ref_grads = _reference(op, seed, T, use_docs, W, slopes)
    outs = run_distributed(_run_sp, W, op, seed, T, use_docs, W, slopes)
    C = T // W
    out = torch.cat([o for o, _ in outs], dim=2)
    assert_rel_close(out, ref_out, TOL, f"{op} output")
    for i, name in enumerate("qkv"):
        g = torch.cat([grads[i] for _, grads in outs], dim=2)
        assert g.shape[2] == W * C
        assert_rel_close(g, ref_grads[i], TOL, f"{op} d{name}")


def test_bidirectional_lasp2():
    T, W = 40, 2
    ref_out, ref_grads = _reference("lasp2_bidir", 0, T, False, W, torch.zeros(2))
    outs = run_distributed(_run_sp, W, "lasp2_bidir", 0, T, False, W, torch.zeros(2))
    assert_rel_close(torch.cat([o for o, _ in outs], 2), ref_out, TOL, "bidirectional output")
    for i in range(3):
        assert_rel_close(torch.cat([g[i] for _, g in outs], 2), ref_grads[i], TOL, f"grad {i}")


def _bytes(rt, T, op):
    from plait.parallel.collectives import CommCounter
    from plait.parallel.lasp2 import lightning_attention_lasp2
    from plait.parallel.lasp2h import attention_lasp2h

    W = rt.world_size
    q, k, v, do = _inputs(0, 1, 2, T, 16)
    C = T // W
    sl = slice(rt.rank * C, (rt.rank + 1) * C)
    leaves = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
    group = torch.distributed.group.WORLD
    with CommCounter().record() as c:
        out = (
            lightning_attention_lasp2(*leaves, torch.tensor([0.1, 0.2]), group)
            if op == "lasp2"
            else attention_lasp2h(*leaves, group)
        )
        (out * do[:, :, sl]).sum().backward()
    return c.bytes


def test_lasp2_bytes_do_not_grow_with_length():
    a = run_distributed(_bytes, 2, 64, "lasp2")[0]
    b = run_distributed(_bytes, 2, 256, "lasp2")[0]
    assert a == b and sum(a.values()) == 2 * (1 * 2 * 16 * 16 * 4)  # one state each way
    h = run_distributed(_bytes, 2, 256, "lasp2h")[0]
    assert sum(h.values()) > 4 * sum(b.values())


def _run_ring(rt, seed, T, use_docs, zigzag):
    from plait.parallel.ring import layout_index, ring_attention

    W, r = rt.world_size, rt.rank
    q, k, v, do = _inputs(seed, 2, 2, T, 16)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    idx = layout_index(T, W, r, zigzag)
    leaves = [x[:, :, idx].clone().requires_grad_() for x in (q, k, v)]
    out = ring_attention(
        *leaves, idx, torch.distributed.group.WORLD, doc_ids=None if docs is None else docs[:, idx]
    )
    (out * do[:, :, idx]).sum().backward()
    return idx, out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("zigzag", [False, True])
@pytest.mark.parametrize("use_docs", [False, True])
def test_ring_attention_equals_single_rank(W, zigzag, use_docs):
    T = 20 * 2 * W  # chunks of 20 (zigzag) or 40 tokens per rank
    ref_out, ref_grads = _reference("lasp2h", 0, T, use_docs, W, None)
    outs = run_distributed(_run_ring, W, 0, T, use_docs, zigzag)
    out = torch.zeros_like(ref_out, dtype=torch.float32)
    grads = [torch.zeros_like(g, dtype=torch.float32) for g in ref_grads]
    for idx, o, gs in outs:
        out[:, :, idx] = o
        for g, part in zip(grads, gs):
            g[:, :, idx] = part
    assert_rel_close(out, ref_out, TOL, "ring output")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_rel_close(g, rg, TOL, f"ring d{name}")


def _run_swa(rt, seed, T, window, use_docs):
    from plait.parallel.halo import swa_sp

    W, r = rt.world_size, rt.rank
    C = T // W
    q, k, v, do = _inputs(seed, 2, 2, T, 16)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    sl = slice(r * C, (r + 1) * C)
    leaves = [x[:, :, sl].clone().requires_grad_() for x in (q, k, v)]
    out = swa_sp(*leaves, window, torch.distributed.group.WORLD,
                 doc_ids=None if docs is None else docs[:, sl])
    (out * do[:, :, sl]).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("window", [1, 7, 30])
@pytest.mark.parametrize("use_docs", [False, True])
def test_sliding_window_halo_equals_single_rank(W, window, use_docs):
    from plait.kernels.swa import swa_naive

    T = 30 * W
    q, k, v, do = _inputs(0, 2, 2, T, 16)
    docs = _docs(2, T, 0, _borders(T, W)) if use_docs else None
    leaves = [x.clone().double().requires_grad_() for x in (q, k, v)]
    ref = swa_naive(*leaves, window, docs)
    (ref * do.double()).sum().backward()
    outs = run_distributed(_run_swa, W, 0, T, window, use_docs)
    assert_rel_close(torch.cat([o for o, _ in outs], 2), ref.detach(), TOL, "swa output")
    for i, name in enumerate("qkv"):
        g = torch.cat([gs[i] for _, gs in outs], 2)
        assert_rel_close(g, leaves[i].grad, TOL, f"swa d{name}")


def _conv_inputs(seed, T, ch=6):
    g = torch.Generator().manual_seed(seed)
    u, dy = torch.randn(2, T, ch, generator=g), torch.randn(2, T, ch, generator=g)
    return u, dy


def _run_conv(rt, op, seed, T, use_docs, arg):
    from plait.parallel.convs import diag_ssm_sp, long_conv_sp, short_conv_sp

    W, r = rt.world_size, rt.rank
    C = T // W
    u, dy = _conv_inputs(seed, T)
    docs = _docs(2, T, seed, _borders(T, W)) if use_docs else None
    sl = slice(r * C, (r + 1) * C)
    x = u[:, sl].clone().requires_grad_()
    d = None if docs is None else docs[:, sl]
    group = torch.distributed.group.WORLD
    if op == "short":
        out = short_conv_sp(x, arg, None, group, doc_ids=d)
    elif op == "long":
        out = long_conv_sp(x, arg, group, doc_ids=d)
    else:
        out = diag_ssm_sp(x, *arg[:3], group, doc_ids=d, method=arg[3])
    (out * dy[:, sl]).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize("op", ["short", "long_halo", "long_gather", "diag_ssm", "diag_ssm_zoh"])
@pytest.mark.parametrize("use_docs", [False, True])
def test_convolutions_under_sp_equal_single_rank(W, op, use_docs):
    from plait.kernels.longconv import diag_ssm_kernel, long_conv
    from plait.kernels.shortconv import short_conv

    T = 25 * W
    u, dy = _conv_inputs(0, T)
    docs = _docs(2, T, 0, _borders(T, W)) if use_docs else None
    g = torch.Generator().manual_seed(9)
    if op == "short":
        arg = torch.randn(6, 4, generator=g)
        ref_fn = lambda x: short_conv(x, arg, doc_ids=docs)  # noqa: E731
    elif op in ("long_halo", "long_gather"):
        arg = torch.randn(6, 10 if op == "long_halo" else T, generator=g) / 3
        ref_fn = lambda x: long_conv(x, arg, doc_ids=docs)  # noqa: E731
    else:
        log_dt = torch.randn(6, generator=g) * 0.3 - 2
        A = torch.complex(-torch.rand(6, 4, generator=g) - 0.1, torch.randn(6, 4, generator=g))
        Cc = torch.complex(torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g))
        method = "zoh" if op.endswith("zoh") else "bilinear"
        arg = (log_dt, A, Cc, method)
        k = diag_ssm_kernel(log_dt, A, Cc, T, method)
        ref_fn = lambda x: long_conv(x, k, doc_ids=docs)  # noqa: E731
    x = u.clone().requires_grad_()
    ref = ref_fn(x)
    (ref * dy).sum().backward()
    kind = {"long_halo": "long", "long_gather": "long"}.get(op, op)
    outs = run_distributed(
        _run_conv, W, "diag" if kind.startswith("diag") else kind, 0, T, use_docs, arg
    )
    assert_rel_close(torch.cat([o for o, _ in outs], 1), ref.detach(), 1e-5, f"{op} output")
    assert_rel_close(torch.cat([gr for _, gr in outs], 1), x.grad, 1e-5, f"{op} du")
