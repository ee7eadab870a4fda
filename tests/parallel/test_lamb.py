"""LAMB over flat partitions of many tensors (parallel/lamb.py's ZeRO 1-2 path), without
DeepSpeed: tensors laid into one flat buffer with alignment gaps and trailing padding, the
buffer cut across 1-3 ranks anywhere (inside tensors too), each rank stepping its slice. The
result must be per-tensor LAMB on the whole tensors (a float64 reference). DeepSpeed's own
layouts are covered end to end in tests/launcher/test_engine.py; this one reaches the gaps,
which DeepSpeed makes only with ``parameter_alignment``."""

from __future__ import annotations

import pytest
import torch

from plait.parallel.lamb import Lamb
from tests.distributed import run_distributed

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (9, 3)]
GAPS = [3, 0, 2, 1, 0]  # zeros after each tensor (DeepSpeed's per-parameter alignment)
TAIL = 5  # padding that makes the buffer divisible by the ranks
HYPER = dict(lr=3e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, min_trust=0.01,
             max_trust=10.0)
STEPS = 3


def _tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    weights[3].zero_()  # ||w|| = 0: trust 1
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
             for _ in range(STEPS)]
    return weights, grads


def _reference(seed: int):
    """Per-tensor LAMB in float64, written from the algorithm (nothing shared with plait)."""
    weights, grads = _tensors(seed)
    b1, b2 = HYPER["betas"]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    for t in range(1, STEPS + 1):
        for i, w in enumerate(weights):
            g = grads[t - 1][i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + HYPER["eps"])
            u = u + HYPER["weight_decay"] * w
            wn, un = w.norm(), u.norm()
            trust = 1.0
            if wn > 0 and un > 0:
                trust = (wn / un).clamp(HYPER["min_trust"], HYPER["max_trust"])
            weights[i] = w - HYPER["lr"] * trust * u
    return weights


def _layout():
    """(start, numel) of each tensor in the flat buffer, and the buffer's length."""
    spans, at = [], 0
    for shape, gap in zip(SHAPES, GAPS, strict=True):
        n = int(torch.Size(shape).numel())
        spans.append((at, n))
        at += n + gap
    return spans, at + TAIL


def _flat_lamb(rt, seed: int, cut: list[int]):
    """This rank holds [cut[r], cut[r+1]) of the flat buffer."""
    import torch.distributed as dist

    weights, grads = _tensors(seed)
    spans, total = _layout()
    lo, hi = cut[rt.rank], cut[rt.rank + 1]

    def flat_of(tensors):
        buf = torch.zeros(total, dtype=torch.float32)
        for (s, n), x in zip(spans, tensors, strict=True):
            buf[s : s + n] = x.flatten().float()
        return buf[lo:hi].clone()

    flat = flat_of(weights)
    fragments = []
    for j, (s, n) in enumerate(spans):
        a, b = max(s, lo), min(s + n, hi)
        if a < b:
            fragments.append((a - lo, b - a, j))
    group = {"params": [flat], "names": [f"t{j}" for j in range(len(SHAPES))]}
    opt = Lamb([group], partition_group=dist.group.WORLD, flat_partitions=True, **HYPER)
    opt.link_partitions([(flat, fragments, len(SHAPES))])
    for t in range(STEPS):
        flat.grad = flat_of(grads[t])
        opt.step()
    full: list = [None] * (len(cut) - 1)
    dist.all_gather_object(full, flat)  # unequal slices: gloo's all_gather wants equal sizes
    buf = torch.cat(full)
    return [buf[s : s + n].view(shape) for (s, n), shape in zip(spans, SHAPES)], buf


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cut_at", [[], [40], [21, 70]], ids=["1rank", "2ranks", "3ranks"])
def test_flat_partitions_equal_per_tensor_lamb(seed, cut_at):
    _, total = _layout()
    cut = [0, *cut_at, total]
    ref = _reference(seed)
    out, buf = run_distributed(_flat_lamb, len(cut) - 1, seed, cut)[0]
    for j, (got, want) in enumerate(zip(out, ref, strict=True)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6, msg=f"tensor {j}")
    spans, _ = _layout()
    covered = torch.zeros(total, dtype=torch.bool)
    for s, n in spans:
        covered[s : s + n] = True
    assert (buf[~covered] == 0).all(), "padding must stay zero"


def test_unlinked_partition_is_refused():
    flat = torch.zeros(10, requires_grad=True)
    flat.grad = torch.ones(10)
    opt = Lamb([{"params": [flat], "names": ["a", "b"]}], flat_partitions=True)
    with pytest.raises(RuntimeError, match="link_partitions"):
        opt.step()
    with pytest.raises(ValueError, match="overlaps"):
        opt.link_partitions([(flat, [(0, 6, 0), (4, 3, 1)], 2)])
