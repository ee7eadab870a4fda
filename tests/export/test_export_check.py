"""The export checks itself (launcher/export_check.py): before an export is renamed into
place, transformers loads it in a process that cannot import plait and must compute plait's
logits and greedy decode.

* A tiny trained checkpoint exports with the check passing (bf16: plait's side runs on the
  same bf16-rounded weights), and the result is recorded in config.json and README.md.
* The check catches a deliberately broken export: the modeling code shipped with one
  mixer's forward changed (lightning attention's keys negated) fails through the CLI
  with one line naming the difference, exit code 2, nothing under --out and no
  ``.tmp-*`` beside it. The same broken code exports without complaint under --no-verify, so the
  failure is the check's doing (and --no-verify is recorded as ``verified: false``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from plait.launcher import export_check
from tests.cli import run_module
from tests.launcher.test_train_job import _run, _tiny

REPO = Path(__file__).resolve().parents[2]


def _export(args: list[str]):
    """The CLI in a forked child (tests/cli.py): the check builds plait's model in the
    exporting process, whose one-rank process group must not live on in pytest's process
    (a later fork of it, by another test, could inherit a held lock)."""
    return run_module("plait.launcher.export", args, cwd=REPO)

# lightning attention's keys with their sign flipped: the mixer's output flips sign (its
# norm keeps the scale). Decisive even on a model trained a few steps, whose near-uniform
# attention hides subtler faults: a 10% error in the softmax temperature moves a 30-step
# model's logits by 3e-4 relative (under the tolerance), the 200-step demo model's by 1.8e-2.
MUTATION = ("LightningAttention", "q, k = F.silu(q), F.silu(k)", "q, k = F.silu(q), -F.silu(k)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """configs/tiny.yaml (LALA: lightning and softmax attention) trained 2 steps."""
    out = tmp_path_factory.mktemp("check") / "run"
    _run(_tiny(out, "training.steps=2", "training.eval_every=0", "checkpoint.resume=never"))
    return out / "checkpoints"


@pytest.fixture
def broken_code(tmp_path, monkeypatch) -> Path:
    """Lightning attention's HF module (the transnormer family's hf_mixer.py, shipped as
    mixer_transnormer.py) with MUTATION applied, registered in place of the real one for
    this test (forked children inherit it)."""
    import dataclasses

    from plait.models.common import family

    fam = family.family_of("L")
    code = tmp_path / "broken_hf_mixer.py"
    src = Path(fam.hf_code).read_text()
    cls, line, broken = MUTATION
    start = src.index(f"class {cls}(")
    at = src.index(line, start)
    end = src.find("\nclass ", start + 1)
    assert end < 0 or at < end, f"{line!r} is no longer in {cls}"
    code.write_text(src[:at] + broken + src[at + len(line) :])
    broken_fam = dataclasses.replace(fam, hf_code=code)
    monkeypatch.setitem(family._FAMILIES, fam.name, broken_fam)
    for symbol, (f, letter) in list(family._LETTERS.items()):
        if f is fam:
            monkeypatch.setitem(family._LETTERS, symbol, (broken_fam, letter))
    return code


def test_export_passes_its_check_and_records_it(tmp_path, ckpt):
    out = tmp_path / "hf"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--no-progress", "--dtype", "bf16",
            "--verify-tokens", "128"]
    ran = _export(args)
    assert ran.code == 0, ran.text[-3000:]
    said = ran.out
    assert "export check: passed: 128 tokens (corpus)" in said, said
    v = json.loads((out / "config.json").read_text())["plait"]["verified"]
    assert v["tokens"] == 128 and v["source"] == "corpus"
    assert v["tolerance"] == pytest.approx(export_check.REL_TOL * v["logit_scale"])
    assert v["max_abs_diff"] <= v["tolerance"] and v["step_max_abs_diff"] <= v["tolerance"]
    assert v["top1_agreement"] >= 0.99 and v["tokenizer_equal"] is True  # top-1 flips at ties
    # all 16 greedy tokens equal, or equal up to a tie (top-2 logits within the tolerance)
    assert v["greedy_equal"] == 16 or v["greedy_tie_at"] == v["greedy_equal"], v
    assert v["transformers"] and v["seconds"] > 0
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "step 2" in card
    assert "trust_remote_code=True" in card and "bf16-rounded weights" in card
    assert f"logits within {v['max_abs_diff']:.1e}" in card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no .tmp-hf left


def test_export_self_check_catches_a_deliberately_broken_export(
    tmp_path, ckpt, broken_code
):
    out = tmp_path / "hf"
    args = ["--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    ran = _export(args)
    assert ran.code == 2, ran.text[-3000:]
    err = ran.err
    assert err.count("\n") == 1, err
    assert err.startswith("export: error: export check: logits differ by "), err
    assert f"nothing was written to {out}; --no-verify skips the check" in err, err
    m = re.search(r"logits differ by (\S+) \(max abs, tolerance (\S+)\)", err)
    assert float(m[1]) > 100 * float(m[2]), err  # far above the tolerance, not borderline
    assert list(tmp_path.iterdir()) == [broken_code]  # nothing under --out, no .tmp-hf

    # with the check off, the same broken code exports: the failure above is the check's
    assert _export([*args, "--no-verify"]).code == 0
    assert MUTATION[2] in (out / "mixer_transnormer.py").read_text()
    assert json.loads((out / "config.json").read_text())["plait"]["verified"] is False
    assert "Not verified: exported with `--no-verify`" in (out / "README.md").read_text()
