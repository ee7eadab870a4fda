"""A run whose config spells out its model (no ``model.preset``) goes the whole way: it
trains, exports (the export checks itself), evaluates, imports back with ``--from-hf``, and
the import evaluates and exports again. Each step used to stop: the saved empty preset was
applied as a name (``model.preset: '' is not one of ...``), and an imported checkpoint had no
run config (``KeyError: 'config'``).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli import run_module

REPO = Path(__file__).resolve().parents[2]


def _ok(ran) -> str:
    assert ran.code == 0, ran.text[-4000:]
    return ran.out


def test_a_run_without_a_preset_exports_evaluates_and_reimports(tmp_path):
    cfg = tmp_path / "spelled_out.yaml"
    cfg.write_text(
        "out_dir: run\n"
        "model:\n  pattern: LALA\n  num_layers: 4\n  hidden_size: 64\n  num_heads: 4\n"
        "  tie_embeddings: true\n"
        "data:\n  seq_len: 64\n"
        "training:\n  steps: 3\n  micro_batch_size: 4\n  eval_every: 0\n"
        "logging:\n  progress_bar: false\n"
    )
    _ok(run_module("plait.launcher.train", ["--config", str(cfg)], cwd=tmp_path))
    saved = json.loads(next((tmp_path / "run" / "checkpoints").glob("step3/meta.json"))
                       .read_text())
    assert saved["config"]["model"]["preset"] == ""

    evaluate = ["--lengths", "1", "--batches", "1", "--passkey-samples", "0"]
    _ok(run_module("plait.launcher.export", ["--checkpoint", "run/checkpoints", "--out", "hf",
                                             "--no-progress"], cwd=tmp_path))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["plait"]["verified"]
    _ok(run_module("plait.launcher.evaluate", ["--checkpoint", "run/checkpoints", "--out",
                                               "eval_run", *evaluate], cwd=tmp_path))
    assert (tmp_path / "eval_run" / "eval.json").is_file()

    out = _ok(run_module("plait.launcher.export", ["--from-hf", "hf", "--out", "imported"],
                         cwd=tmp_path))
    assert "imported hf -> imported/step0" in out
    assert (tmp_path / "imported" / "step0" / "tokenizer.model").is_file()
    _ok(run_module("plait.launcher.evaluate", ["--checkpoint", "imported", "--out",
                                               "eval_import", "--set",
                                               "data.datasets=[run/data]", "--set",
                                               "training.micro_batch_size=4", *evaluate],
                   cwd=tmp_path))
    a = json.loads((tmp_path / "eval_run" / "eval.json").read_text())["positions"][0]["mean"]
    b = json.loads((tmp_path / "eval_import" / "eval.json").read_text())["positions"][0]["mean"]
    assert abs(a - b) < 1e-4, (a, b)  # the same weights evaluated the same way
    _ok(run_module("plait.launcher.export", ["--checkpoint", "imported", "--out", "hf2",
                                             "--no-progress"], cwd=tmp_path))
    first = json.loads((tmp_path / "hf" / "config.json").read_text())
    second = json.loads((tmp_path / "hf2" / "config.json").read_text())
    for key in ("pattern", "hidden_size", "num_heads", "vocab_size", "max_position_embeddings"):
        assert first[key] == second[key], key
    assert second["plait"]["verified"]
