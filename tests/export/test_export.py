"""Export end to end, as a user runs it: train under TP=2 through the CLI, export with
``python -m plait.launcher.export``, load with transformers in a process that cannot import
plait, and compare with plait's own forward and greedy decode; then import back and train on.

Per model (every family's tiny preset and one model with all eight letters): logits on a
held-out batch (packed documents off) within 1e-4 max abs, top-1 agreement 100%, KL <= 1e-6;
greedy ``generate()`` of 32 tokens after a 100-token prompt equal to plait's token for token;
the HF tokenizer encoding the held-out text exactly as sentencepiece does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from plait.data.tokenizer import Tokenizer
from plait.launcher import checkpoint
from plait.launcher import convert as exp
from plait.models.common import build_model
from plait.parallel.tensor_parallel import load_full_state
from tests.distributed import run_distributed
from tests.launcher.test_train_job import _run, _tiny

REPO = Path(__file__).resolve().parents[2]
TINY = ["transnormer-tiny", "based-tiny", "h3-tiny", "seqboat-tiny", "moh-tiny"]
MIXED = ("model.pattern=LABWCHSM", "model.num_layers=8", "model.hidden_size=64",
         "model.num_heads=4", "model.h3.state_size=16", "model.seqboat.window=16",
         "model.moh.shared_heads=2", "model.lrpe=first", "model.lightning_norm=full")
PROMPT, NEW = 100, 32

# Runs in a fresh interpreter without site processing: site-packages is added by hand, so the
# editable-install hook that makes plait importable is never run.
HF_SIDE = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("plait") is None, "plait is importable"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, job = sys.argv[2], json.load(open(sys.argv[3]))
tok = AutoTokenizer.from_pretrained(d)
model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=job["dtype"])
model.eval()
model.generation_config.eos_token_id = None  # compared with plait's greedy, which never stops
ids = torch.tensor(job["tokens"])
out = {"encoded": tok(job["text"], add_special_tokens=False)["input_ids"],
       "class": type(model).__name__}
with torch.no_grad():
    out["logits"] = model(ids).logits.float()
    prompt = ids[:1, : job["prompt"]]
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=job["new"], do_sample=False)
    out["greedy"] = gen[:, job["prompt"]:]
    out["sampled"] = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    max_new_tokens=4, do_sample=True, top_k=5).shape
torch.save(out, sys.argv[4])
"""


def hf_side(directory: Path, job: dict, tmp: Path) -> dict:
    """Run HF_SIDE on an export; returns what it saved."""
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "hf_side.py").write_text(HF_SIDE)
    site = sysconfig.get_paths()["purelib"]
    cmd = [sys.executable, "-I", "-S", str(tmp / "hf_side.py"), site, str(directory),
           str(tmp / "job.json"), str(tmp / "hf_out.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(tmp / "hf_out.pt")


def _plait_side(rt, ckpt: Path, tokens: torch.Tensor):
    state, meta = exp.read_weights(checkpoint.resolve(ckpt))
    cfg, _ = exp.model_config(meta, ckpt)
    model = build_model(cfg, 1, vocab_size=state["embedding.weight"].shape[0]).eval()
    load_full_state(model, state)
    with torch.no_grad():
        return model(tokens), model.greedy(tokens[:1, :PROMPT], NEW)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The bundled corpus prepared once (tokenizer and shards) for every run here."""
    out = tmp_path_factory.mktemp("prep") / "run"
    _run(_tiny(out, "training.steps=1", "training.eval_every=0", "checkpoint.resume=never"))
    return out / "data"


def _train(out: Path, data: Path, model: tuple[str, ...], steps: int = 3):
    args = _tiny(out, f"training.steps={steps}", "training.eval_every=0", "data.seq_len=128",
                 f"data.datasets=[{data}]", "parallel.tensor_parallel=2", *model)
    return _run(args, nproc=2)


def _export(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "plait.launcher.export", "--no-progress", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _held_out(data: Path) -> tuple[str, torch.Tensor]:
    """A text the model did not train on, its tokens (2 rows of PROMPT + NEW + 8)."""
    text = " ".join(
        f"On day {i} the committee resolved that nothing whatever had happened." for i in range(40)
    )
    ids = Tokenizer(data / "tokenizer.model").encode(text)
    n = PROMPT + NEW + 8
    assert len(ids) >= 2 * n
    return text, torch.tensor([ids[:n], ids[n : 2 * n]])


@pytest.mark.parametrize("name", TINY + ["mixed"])
def test_export_loads_in_transformers_and_matches_plait(tmp_path, data_dir, name):
    model = MIXED if name == "mixed" else (f"model.preset={name}",)
    _train(tmp_path / "run", data_dir, model)
    ckpt = tmp_path / "run" / "checkpoints"
    # --no-verify: this test compares the export with plait more thoroughly than the export's
    # self-check does (two rows, KL, 32 greedy tokens); test_export_check.py tests the check
    proc = _export("--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"),
                   "--max-shard-size", "200KB", "--no-verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded
    text, tokens = _held_out(data_dir)
    logits, greedy = run_distributed(_plait_side, 1, ckpt, tokens)[0]
    job = {"tokens": tokens.tolist(), "text": text, "prompt": PROMPT, "new": NEW,
           "dtype": "float32"}
    hf = hf_side(tmp_path / "hf", job, tmp_path)
    assert hf["class"] == "PlaitForCausalLM"
    assert hf["encoded"] == Tokenizer(data_dir / "tokenizer.model").encode(text)
    err = (hf["logits"] - logits).abs().max().item()
    assert err <= 1e-4, f"max abs logit difference {err:.2e}"
    assert torch.equal(hf["logits"].argmax(-1), logits.argmax(-1)), "top-1 differs"
    p, q = logits.log_softmax(-1), hf["logits"].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert kl <= 1e-6, f"KL {kl:.2e}"
    assert torch.equal(hf["greedy"], greedy), "generate() differs from plait's greedy decode"
    assert tuple(hf["sampled"]) == (1, PROMPT + 4)


def test_round_trip_bf16_and_training_from_an_import(tmp_path, data_dir):
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    _train(run, data_dir, ("model.preset=h3-tiny",), steps=8)
    # fp32 unchecked (the round trip below is bit-exact); the bf16 export runs the self-check
    proc = _export("--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--no-verify")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _export("--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = exp.read_weights(checkpoint.resolve(ckpt))
    b, _ = exp.read_weights(tmp_path / "imported" / "step0")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "plait -> HF -> plait is not bit-identical"

    # bf16: passes the export's self-check (plait on the same bf16-rounded weights), loads
    # and generates
    proc = _export("--checkpoint", str(ckpt), "--out", str(tmp_path / "hf16"), "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export check: passed" in proc.stdout, proc.stdout
    verified = json.loads((tmp_path / "hf16" / "config.json").read_text())["plait"]["verified"]
    assert verified["max_abs_diff"] <= verified["tolerance"], verified
    text, tokens = _held_out(data_dir)
    job = {"tokens": tokens[:, :40].tolist(), "text": text, "prompt": 20, "new": 8,
           "dtype": "bfloat16"}
    hf = hf_side(tmp_path / "hf16", job, tmp_path)
    assert hf["greedy"].shape == (1, 8) and torch.isfinite(hf["logits"]).all()

    # training continues from the import (a new run), and starts where the export left off
    common = ("model.preset=h3-tiny", "training.steps=2")
    fresh = _train(tmp_path / "fresh", data_dir, common, steps=2)
    cont = _train(tmp_path / "cont", data_dir,
                  (*common, f"checkpoint.init_from={tmp_path / 'imported'}"), steps=2)
    assert "initialised from" in cont.stdout
    first = {}
    for key, out in (("fresh", tmp_path / "fresh"), ("cont", tmp_path / "cont")):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        first[key] = next(r["loss"] for r in rows if r["kind"] == "train" and r["step"] == 1)
    assert first["cont"] < first["fresh"] - 0.05, first
    del fresh


def test_bad_inputs_are_one_clear_line(tmp_path):
    proc = _export("--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no such directory" in proc.stderr
    half = tmp_path / "ck" / "step5"
    half.mkdir(parents=True)
    (half / "meta.json").write_text("{}")
    proc = _export("--checkpoint", str(half), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "no completion marker" in proc.stderr, proc.stderr
    proc = _export("--from-hf", str(tmp_path), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "no config.json" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lm_eval_runs_on_an_export(tmp_path, data_dir):
    """lm-eval-harness's ``hf`` model on a local task (plait.data.lastword over the held-out
    split): it loads the export with trust_remote_code, scores, and writes its results."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed (pip install -e '.[eval]'; `make setup` does)")
    from plait.data.lastword import TASK, write_task

    run = tmp_path / "run"
    _run(_tiny(run, "training.steps=3", "training.eval_every=0", "data.seq_len=128",
               f"data.datasets=[{data_dir}]"))
    assert (
        _export("--checkpoint", str(run / "checkpoints"), "--out", str(tmp_path / "hf")).returncode
        == 0
    )
    write_task(data_dir, tmp_path / "task", docs=12)
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf", "--model_args",
           f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32",
           "--tasks", TASK, "--include_path", str(tmp_path / "task"), "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    scores = results["results"][TASK]
    assert 0.0 <= scores["acc,none"] <= 1.0 and scores["perplexity,none"] > 1.0
