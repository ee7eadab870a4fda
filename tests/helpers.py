"""Numerical comparison helpers shared by the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny): the relative error flash-linear-attention's tests use."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_rel_close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = "") -> None:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if b.double().norm() < 1e-9:  # an exactly-zero reference (e.g. dq at T=1 for Based)
        assert a.double().norm() < tol, f"{what}: expected ~0, got norm {a.double().norm():.3e}"
        return
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def check_against_reference(fn, ref_fn, inputs, grad_out, names, tol, device="cpu"):
    """Run ``fn`` on fp32 copies of ``inputs`` (on ``device``) and ``ref_fn`` on float64
    copies (on CPU); compare the outputs and the gradients of every input under the same
    upstream gradient ``grad_out``."""
    leaves = [t.detach().clone().to(device).requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out * grad_out.to(device)).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_leaves)
    (ref * grad_out.double()).sum().backward()
    assert_rel_close(out.cpu(), ref, tol, "output")
    for name, a, b in zip(names, leaves, ref_leaves):
        assert_rel_close(a.grad.cpu(), b.grad, tol, f"d{name}")


def tp_forward_backward(model, full_state, x, y) -> dict:
    """Load the full logical weights (if given) into this rank's TP shard, run logits and loss
    forward and the loss backward; return full logits, loss, weights and gradients (gathered
    over TP) and the logical parameter count, for a TP=n == TP=1 comparison."""
    from plait.parallel.tensor_parallel import (
        gather_full,
        gather_vocab_logits,
        load_full_state,
        logical_numel,
    )

    if full_state is not None:
        load_full_state(model, full_state)
    logits = gather_vocab_logits(model(x))
    loss = model(x, y)
    loss.backward()
    return {
        "state": gather_full(model),
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": gather_full(model, grads=True),
        "numel": logical_numel(model),
    }


def assert_tp_equal(out: dict, ref: dict, what: str = "") -> None:
    """fp32, rtol 1e-5: the only differences are summation orders of the row-parallel
    all-reduce and the sharded softmax. Every reference gradient must be non-zero (else the
    comparison of that tensor would be vacuous)."""
    assert out["numel"] == ref["numel"]
    torch.testing.assert_close(out["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    assert abs(out["loss"] - ref["loss"]) < 1e-5
    assert out["grads"].keys() == ref["grads"].keys()
    for k, g in ref["grads"].items():
        assert g.abs().sum() > 0, f"{what}: {k} got no gradient"
        torch.testing.assert_close(out["grads"][k], g, rtol=1e-5, atol=1e-6, msg=f"{what}: {k}")


def train_rows(out: Path) -> list[dict]:
    """The training rows of a run's metrics.jsonl so far (none before it exists; a line being
    written is skipped): what tests watching a live run poll."""
    f = Path(out) / "metrics.jsonl"
    if not f.is_file():
        return []
    rows = []
    for line in f.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # being written
            pass
    return [r for r in rows if r["kind"] == "train"]
