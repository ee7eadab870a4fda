"""No pickle, ever: a crafted checkpoint or HF directory cannot run code in plait.

The planted payload is a pickle whose loading runs ``os.system`` (it would create a marker
file). It is planted where an unpickling loader would find it, with every hash in meta.json
and the completion marker recomputed, so that integrity checks alone would let it through:
1. a checkpoint whose meta.json says ``kind: deepspeed-zero3`` (the kind that used to select
   DeepSpeed's ``torch.load(weights_only=False)``), with ``deepspeed/*.pt`` pickles added;
2. a checkpoint whose shard file is swapped for a pickle (a ZeRO-3 run's checkpoint is the
   same safetensors format as every other layout's now);
3. an HF directory with a ``pytorch_model.bin`` pickle beside (or instead of) safetensors.
Training's resume (auto and explicit), ``init_from``, export, evaluate and the import are
each run on them as a user would: each refuses with one line saying why (or, for 3, reads
the safetensors alone), and the payload never runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.cli import run_module

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"module": _Payload(marker)}, f)


def _rehash(ckpt: Path) -> None:
    """Recompute every file's size and sha256 in meta.json (and add new files), then the
    completion marker: what a forger does."""
    meta = json.loads((ckpt / "meta.json").read_text())
    for f in sorted(ckpt.rglob("*")):
        rel = str(f.relative_to(ckpt))
        if f.is_file() and rel not in ("meta.json", "COMPLETE"):
            data = f.read_bytes()
            meta["files"][rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    text = json.dumps(meta, indent=1)
    (ckpt / "meta.json").write_text(text)
    (ckpt / "COMPLETE").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def _train_args(out: Path, *sets: str) -> list[str]:
    args = ["--config", TINY, "--set", f"out_dir={out}", "--set", "logging.progress_bar=false",
            "--set", "training.eval_every=0"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("no_pickle")
    run = root / "run"
    ran = run_module("plait.launcher.train", _train_args(run, "training.steps=2"), cwd=root)
    assert ran.code == 0, ran.text[-3000:]
    good = run / "checkpoints" / "step2"
    marker = root / "PAYLOAD_RAN"

    zero3 = root / "zero3" / "checkpoints" / "step2"  # a run directory whose checkpoint is it
    shutil.copytree(good, zero3)
    meta = json.loads((zero3 / "meta.json").read_text())
    meta["kind"] = "deepspeed-zero3"
    (zero3 / "meta.json").write_text(json.dumps(meta))
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        _plant(zero3 / "deepspeed" / name, marker)
    (zero3 / "deepspeed" / "latest").write_text("deepspeed")
    _rehash(zero3)

    swapped = root / "swapped" / "checkpoints" / "step2"
    shutil.copytree(good, swapped)
    _plant(swapped / "shard-00000.safetensors", marker)
    _rehash(swapped)

    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "plait"}))
    _plant(hf / "pytorch_model.bin", marker)
    return {"root": root, "run": run, "zero3": zero3, "swapped": swapped, "hf": hf,
            "marker": marker}


def _refused(ran, *words: str) -> None:
    assert ran.code == 2, ran.text[-3000:]
    assert "Traceback" not in ran.text, ran.text[-3000:]
    lines = [x for x in ran.err.splitlines() if x.strip()]
    assert len(lines) == 1, ran.err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("which", ["zero3", "swapped"])
def test_a_planted_pickle_never_runs(planted, which, tmp_path):
    ckpt, marker = planted[which], planted["marker"]
    why = "pickled" if which == "zero3" else "not a safetensors file"
    run_dir = ckpt.parent.parent
    # resume, automatic: the run's own checkpoint directory holds it
    ran = run_module("plait.launcher.train", _train_args(run_dir, "training.steps=4"),
                     cwd=tmp_path)
    if which == "zero3":
        _refused(ran, str(ckpt), why)
    else:  # an unreadable file is a damaged checkpoint: reported, skipped, the run starts over
        assert ran.code == 0 and f"{ckpt}: shard-00000.safetensors: {why}" in ran.out, ran.text
    # resume, explicit; init_from; export; evaluate
    fresh = tmp_path / "fresh"
    _refused(run_module("plait.launcher.train",
                        _train_args(fresh, f"checkpoint.resume={ckpt}"), cwd=tmp_path),
             "checkpoint.resume", why)
    _refused(run_module("plait.launcher.train",
                        _train_args(fresh, f"checkpoint.init_from={ckpt}"), cwd=tmp_path),
             "checkpoint.init_from", why)
    _refused(run_module("plait.launcher.export", ["--checkpoint", str(ckpt), "--out",
                                                  str(tmp_path / "hf")], cwd=tmp_path), why)
    _refused(run_module("plait.launcher.evaluate", ["--checkpoint", str(ckpt), "--out",
                                                    str(tmp_path / "eval")], cwd=tmp_path), why)
    assert not marker.exists(), "the planted pickle ran"
    assert not (tmp_path / "hf").exists() and not (tmp_path / "eval").exists()


def test_an_hf_directory_is_read_from_safetensors_only(planted, tmp_path):
    """The import reads ``*.safetensors`` alone: a directory with only a pickled
    ``pytorch_model.bin`` has no weights to import, and the pickle is never opened."""
    ran = run_module("plait.launcher.export", ["--from-hf", str(planted["hf"]), "--out",
                                               str(tmp_path / "imported")], cwd=tmp_path)
    _refused(ran, "--from-hf", "safetensors")
    assert not planted["marker"].exists(), "the planted pickle ran"
    assert not (tmp_path / "imported").exists()
