"""Checkpoints written by an older plait still resume: a frozen checkpoint, made with the
code of 2026-12 (tests/launcher/data/checkpoint_2026_12/README.md says how), is resumed by
the real command for two more steps. It must continue at its step (not start over, not
refuse it) with exactly the weights and optimizer moments its files hold.

A change that fails this test would strand every run in flight at its next restart: old
checkpoints must stay readable (or be refused deliberately, with a new format number and a
line in docs/checkpoints.md).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import plait.launcher.trainer  # noqa: F401  imported before the fork: the run starts in ~1 s
from plait.launcher import checkpoint
from plait.parallel.engine_state import logical_state
from tests.cli import run_module

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "data" / "checkpoint_2026_12"
# The command the fixture was trained with (its README): the run identity must match.
SETS = (
    "out_dir=run data.datasets=[data] model.hidden_size=16 model.num_heads=2 model.num_layers=2 "
    "model.pattern=LA model.ffn_hidden_size=32 data.seq_len=16 training.micro_batch_size=2"
).split()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_a_checkpoint_of_2026_12_resumes_at_its_step(tmp_path, monkeypatch):
    shutil.copytree(FIXTURE / "data", tmp_path / "data")
    shutil.copytree(FIXTURE / "checkpoints", tmp_path / "run" / "checkpoints")
    seen = tmp_path / "loaded.safetensors"
    original = checkpoint.load

    def load_and_record(path, engine, *args, **kwargs):
        """The real load, then what the engine holds: the model's weights (what it computes
        with) and the logical state a save would write (fp32 masters and moments)."""
        meta = original(path, engine, *args, **kwargs)
        got = {f"module:{n}": p.detach().clone() for n, p in engine.module.named_parameters()}
        for name, tensors, opt_step in logical_state(engine):
            got[f"step:{name}"] = torch.tensor(opt_step)
            for k, t in tensors.items():
                got[name if not k else f"{name}::{k}"] = t.clone()
        save_file({k: v.contiguous() for k, v in got.items()}, str(seen))
        return meta

    # patched in this process, inherited by the forked command (trainer calls checkpoint.load)
    monkeypatch.setattr(checkpoint, "load", load_and_record)
    args = ["--config", str(REPO / "configs" / "tiny.yaml")]
    for s in (*SETS, "training.steps=4", "logging.progress_bar=false"):
        args += ["--set", s]
    ran = run_module("plait.launcher.train", args, cwd=tmp_path)
    assert ran.code == 0, ran.text[-4000:]

    # resumed at step 2, not started over
    assert re.search(r"resumed from run/checkpoints/step2 at step 2\b", ran.out), ran.out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 4]
    new = tmp_path / "run" / "checkpoints" / "step4"
    assert checkpoint.verify(new) == ""
    meta = checkpoint.read_meta(new)
    assert (meta["global_steps"], meta["optimizer_step"]) == (4, 4)
    assert meta["loader"]["consumed_samples"] == 8  # 2 steps of 2 sequences, then 2 more

    # the loaded state is the files' tensors, bit for bit
    saved = _tensors(FIXTURE / "checkpoints" / "step2" / "shard-00000.safetensors")
    got = _tensors(seen)
    weights = sorted(k for k in saved if "::" not in k)
    assert sorted(k[len("module:") :] for k in got if k.startswith("module:")) == weights
    assert sorted(k for k in got if not k.startswith(("module:", "step:"))) == sorted(saved)
    for key, t in saved.items():
        assert torch.equal(got[key], t), key
        if "::" not in key:
            assert torch.equal(got[f"module:{key}"], t), key
            assert got[f"step:{key}"].item() == 2, key


def test_identity_compares_only_the_options_of_families_the_pattern_uses():
    """A family registered after a checkpoint was written adds an options section (at its
    defaults) to every run's identity: a model that uses none of its letters resumes; a change
    to a used family's options is still refused."""
    from plait.launcher.checkpoint.identity import RunIdentity
    from plait.models.common import ModelConfig

    def identity(cfg: ModelConfig) -> RunIdentity:
        return RunIdentity(cfg.to_dict(), "lamb", {}, "")

    cfg = ModelConfig(pattern="LALA")
    old = cfg.to_dict()
    del old["gdn"]  # written before the family existed
    assert identity(cfg).differences(RunIdentity(old, "lamb", {}, "")) == {}
    other = ModelConfig(pattern="LALA")
    other.moh.top_k = 3  # M is not in the pattern
    assert identity(other).differences(identity(cfg)) == {}
    used = ModelConfig(pattern="GAGA")
    changed = ModelConfig(pattern="GAGA")
    changed.gdn.key_heads = 2
    assert identity(changed).differences(identity(used)) == {
        "model": ["model.gdn.key_heads: 4 -> 2"]
    }
