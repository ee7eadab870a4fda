"""Every command meets a user's mistake with one line and exit 2, and writes nothing.

A table of bad inputs across the commands (prepare, train, plan, evaluate, export and its
import), each run as a user runs it (``python -m ...``, in a forked child: tests/cli.py). For
each: the exit code is 2; neither stream holds a traceback; the message names the field or
the file; and the watched paths (the run directory, the output, the checkpoint) are exactly as
they were. Train's layout mistakes under torchrun set the launcher's variables (RANK,
WORLD_SIZE): the layout is refused before any process group is joined, so one rank shows
what every rank does. The runner itself is shown to see a traceback (the table is not
vacuous).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.cli import run_module, snapshot

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
QUIET = ["--set", "logging.progress_bar=false"]


@dataclass
class Case:
    id: str
    module: str
    args: list[str]
    expect: list[str]
    """Substrings of the one error line (the field or file it names)."""
    watch: list[str] = field(default_factory=lambda: ["{tmp}/out"])
    env: dict[str, str] = field(default_factory=dict)


def _train(*sets: str, out: str = "{tmp}/out") -> list[str]:
    args = ["--config", TINY, "--set", f"out_dir={out}", *QUIET]
    for s in sets:
        args += ["--set", s]
    return args


def _ranks(world: int) -> dict[str, str]:
    """rank 0 of a torchrun job of ``world`` ranks (nobody else will join: the refusal must
    come before the rendezvous)."""
    return {"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}


PREP = "plait.data.prepare"
TRAIN = "plait.launcher.train"
PLAN = "plait.launcher.plan"
EVAL = "plait.launcher.evaluate"
EXPORT = "plait.launcher.export"

CASES = [
    # python -m plait.data.prepare
    Case("prepare-missing-source", PREP, ["--source", "{files}/nope.jsonl", "--out", "{tmp}/out"],
         ["nope.jsonl", "no such file"]),
    Case("prepare-bad-json", PREP, ["--source", "{files}/bad.jsonl", "--out", "{tmp}/out"],
         ["bad.jsonl:2", "not valid JSON"]),
    Case("prepare-no-text-field", PREP, ["--source", "{files}/nofield.jsonl", "--out",
         "{tmp}/out"], ["nofield.jsonl:1", "no field 'text'"]),
    Case("prepare-binary-garbage", PREP, ["--source", "{files}/garbage.jsonl", "--out",
         "{tmp}/out"], ["garbage.jsonl:1"]),
    Case("prepare-empty-corpus", PREP, ["--source", "{files}/empty.jsonl", "--out", "{tmp}/out"],
         ["empty.jsonl", "no non-empty document"]),
    Case("prepare-unsupported-file", PREP, ["--source", "{files}/table.csv", "--out",
         "{tmp}/out"], ["table.csv", "unsupported file type"]),
    Case("prepare-missing-tokenizer", PREP, ["--source", "{files}/good.jsonl", "--out",
         "{tmp}/out", "--tokenizer", "{files}/nope.model"], ["tokenizer", "nope.model"]),
    Case("prepare-garbage-tokenizer", PREP, ["--source", "{files}/good.jsonl", "--out",
         "{tmp}/out", "--tokenizer", "{files}/garbage.jsonl"], ["garbage.jsonl",
         "not a sentencepiece model"]),
    Case("prepare-out-is-a-file", PREP, ["--source", "{files}/good.jsonl", "--out",
         "{files}/afile"], ["out", "afile"], watch=["{files}/afile"]),
    Case("prepare-val-fraction", PREP, ["--source", "{files}/good.jsonl", "--out", "{tmp}/out",
         "--val-fraction", "1.5"], ["val_fraction"]),
    # python -m plait.launcher.train: the config
    Case("train-missing-config", TRAIN, ["--config", "{tmp}/nope.yaml"], ["nope.yaml",
         "not found"]),
    Case("train-invalid-yaml", TRAIN, ["--config", "{files}/broken.yaml"], ["broken.yaml",
         "not valid YAML"]),
    Case("train-unknown-field", TRAIN, _train("training.stepz=3"), ["training.stepz"]),
    Case("train-bad-letter", TRAIN, _train("model.pattern=LZLA"), ["model.pattern", "'Z'"]),
    Case("train-bad-preset", TRAIN, _train("model.preset=nope"), ["model.preset", "'nope'"]),
    # the layout
    Case("train-tp-without-torchrun", TRAIN, _train("parallel.tensor_parallel=2"),
         ["world size 1", "torchrun"]),
    Case("train-tp-does-not-divide-heads", TRAIN, _train("parallel.tensor_parallel=8"),
         ["parallel.tensor_parallel: 8", "model.num_heads"], env=_ranks(8)),
    Case("train-cp-halo-too-short", TRAIN, _train("parallel.context_parallel=2",
         "model.pattern=LWLW", "data.seq_len=64"), ["data.seq_len: 64", "model.based.window"],
         env=_ranks(2)),
    Case("train-cp-odd-length", TRAIN, _train("parallel.context_parallel=2", "data.seq_len=63"),
         ["data.seq_len: 63", "context_parallel=2"], env=_ranks(2)),
    Case("train-interleaved-one-micro-batch", TRAIN, _train("parallel.pipeline_parallel=2",
         "parallel.virtual_pipeline=2"), ["training.grad_accum", "virtual_pipeline"],
         env=_ranks(2)),
    Case("train-zero3-with-pipeline", TRAIN, _train("parallel.pipeline_parallel=2",
         "parallel.zero_stage=3"), ["parallel.zero_stage: 3"], env=_ranks(2)),
    # the data
    Case("train-seq-len-longer-than-split", TRAIN, _train("data.seq_len=1000000"),
         ["data.seq_len: 1000000", "training split"]),
    Case("train-missing-dataset", TRAIN, _train("data.datasets=[{tmp}/nonexistent]"),
         ["data.datasets[0]", "nonexistent"]),
    Case("train-corpus-bad-json", TRAIN, _train("data.corpus={files}/bad.jsonl"),
         ["bad.jsonl:2", "not valid JSON"]),
    Case("train-corpus-empty", TRAIN, _train("data.corpus={files}/empty.jsonl"),
         ["empty.jsonl", "no non-empty document"]),
    Case("train-missing-corpus", TRAIN, _train("data.corpus={files}/nope.jsonl"),
         ["data.corpus", "nope.jsonl"]),
    Case("train-garbage-tokenizer", TRAIN, _train("data.prepare.tokenizer={files}/bad.jsonl"),
         ["data.prepare.tokenizer", "not a sentencepiece model"]),
    Case("train-rendezvous-port-taken", TRAIN, _train(), ["MASTER_PORT", "{port}"],
         env={**_ranks(2), "MASTER_PORT": "{port}"}),
    # the run directory
    Case("train-out-dir-is-a-file", TRAIN, _train(out="{files}/afile"), ["out_dir", "afile"],
         watch=["{files}/afile"]),
    Case("train-out-dir-locked", TRAIN, _train(out="{locked}"), ["in use by another run",
         "pid"], watch=["{locked}"]),
    # checkpoints
    Case("train-resume-another-tokenizer", TRAIN, _train("data.prepare.vocab_size=1024",
         out="{run}"), ["data.prepare.vocab_size: 2048 -> 1024", "data.prepare.tokenizer="],
         watch=["{run}"]),
    Case("train-resume-another-tokenizer-allowed", TRAIN, _train("data.prepare.vocab_size=1024",
         "checkpoint.allow_changes=[data]", out="{run}"),
         ["embedding.weight", "another vocabulary"], watch=["{run}"]),
    Case("train-resume-another-model", TRAIN, _train("model.hidden_size=64", out="{run}"),
         ["model.hidden_size: 128 -> 64", "init_from"], watch=["{run}"]),
    Case("train-resume-missing-checkpoint", TRAIN, _train("checkpoint.resume={tmp}/none"),
         ["checkpoint.resume", "none"]),
    Case("train-init-from-missing", TRAIN, _train("checkpoint.init_from={tmp}/none"),
         ["checkpoint.init_from", "none"]),
    Case("train-init-from-another-model", TRAIN, _train("checkpoint.init_from={run}/checkpoints",
         "model.hidden_size=64", "data.datasets=[{run}/data]"),
         ["checkpoint.init_from", "has shape"]),
    Case("train-resume-wrong-shape-tensor", TRAIN, _train("checkpoint.resume={forged}",
         "data.datasets=[{run}/data]"), ["checkpoint.resume", "blocks.0.mlp", "shape"],
         watch=["{tmp}/out", "{forged}"]),
    Case("train-resume-forged-shapes", TRAIN, _train("checkpoint.resume={forged_meta}"),
         ["blocks.0.mlp", "this model's is"],
         watch=["{tmp}/out", "{forged_meta}"]),
    # python -m plait.launcher.plan
    Case("plan-tp-does-not-divide-heads", PLAN, ["--config", TINY, "--set",
         "parallel.tensor_parallel=8"], ["parallel.tensor_parallel: 8", "model.num_heads"]),
    Case("plan-interleaved-one-micro-batch", PLAN, ["--config", TINY, "--set",
         "parallel.pipeline_parallel=2", "--set", "parallel.virtual_pipeline=2"],
         ["training.grad_accum"]),
    Case("plan-world-not-a-multiple", PLAN, ["--config", TINY, "--set",
         "parallel.tensor_parallel=2", "--world", "3"], ["--world 3"]),
    # python -m plait.launcher.evaluate
    Case("evaluate-missing-checkpoint", EVAL, ["--checkpoint", "{tmp}/none"],
         ["--checkpoint", "none"]),
    Case("evaluate-out-is-a-file", EVAL, ["--checkpoint", "{run}/checkpoints", "--out",
         "{files}/afile"], ["--out", "afile"], watch=["{files}/afile", "{run}"]),
    Case("evaluate-bad-lengths", EVAL, ["--checkpoint", "{run}/checkpoints", "--lengths", "1,x",
         "--out", "{tmp}/out"], ["--lengths", "1,x"], watch=["{tmp}/out", "{run}"]),
    Case("evaluate-import-without-data", EVAL, ["--checkpoint", "{imported}", "--out",
         "{tmp}/out"], ["data.datasets"], watch=["{tmp}/out", "{imported}"]),
    # python -m plait.launcher.export (and --from-hf)
    Case("export-missing-checkpoint", EXPORT, ["--checkpoint", "{tmp}/none", "--out",
         "{tmp}/out"], ["--checkpoint", "none"]),
    Case("export-out-is-a-file", EXPORT, ["--checkpoint", "{run}/checkpoints", "--out",
         "{files}/afile"], ["--out", "afile"], watch=["{files}/afile", "{run}"]),
    Case("export-wrong-shape-tensor", EXPORT, ["--checkpoint", "{forged}", "--out", "{tmp}/out"],
         ["blocks.0.mlp", "shape"], watch=["{tmp}/out", "{forged}"]),
    Case("export-bad-shard-size", EXPORT, ["--checkpoint", "{run}/checkpoints", "--out",
         "{tmp}/out", "--max-shard-size", "lots"], ["--max-shard-size"]),
    Case("import-no-config", EXPORT, ["--from-hf", "{files}", "--out", "{tmp}/out"],
         ["--from-hf", "config.json"]),
    Case("import-not-plait", EXPORT, ["--from-hf", "{files}/llama", "--out", "{tmp}/out"],
         ["--from-hf", "model_type 'llama'"]),
    Case("import-qwen35-bad-layer-types", EXPORT,
         ["--from-hf", "{files}/qwen35", "--out", "{tmp}/out"],
         ["--from-hf", "config.json", "layer_types", "mamba"]),
    Case("import-bamba-bad-attention-index", EXPORT,
         ["--from-hf", "{files}/bamba", "--out", "{tmp}/out"],
         ["--from-hf", "config.json", "attn_layer_indices", "[5]"]),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files the cases use: bad corpora, a broken YAML, a file where a directory is
    expected, a held lock, a trained tiny run (2 steps) with its checkpoint, a copy of that
    checkpoint with one tensor of the wrong shape (rehashed: it passes every hash), and a
    weights-only checkpoint as ``--from-hf`` writes one."""
    root = tmp_path_factory.mktemp("bad_inputs")
    files = root / "files"
    files.mkdir()
    good = [json.dumps({"text": f"document {i}: the cat sat on the mat {i} times."})
            for i in range(40)]
    (files / "good.jsonl").write_text("\n".join(good) + "\n")
    (files / "bad.jsonl").write_text(good[0] + "\n{not json\n")
    (files / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (files / "garbage.jsonl").write_bytes(bytes(range(128, 256)) * 8 + b"\n")
    (files / "empty.jsonl").write_text("\n\n" + json.dumps({"text": "   "}) + "\n")
    (files / "table.csv").write_text("a,b\n1,2\n")
    (files / "broken.yaml").write_text("model: [unclosed\n")
    (files / "afile").write_text("a file, not a directory\n")
    (files / "llama").mkdir()
    (files / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (files / "qwen35").mkdir()
    (files / "qwen35" / "config.json").write_text(json.dumps({
        "model_type": "qwen3_5_text", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "linear_num_key_heads": 2,
        "linear_num_value_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
        "layer_types": ["linear_attention", "mamba"],
    }))
    (files / "bamba").mkdir()
    (files / "bamba" / "config.json").write_text(json.dumps({
        "model_type": "bamba", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "mamba_n_heads": 4,
        "mamba_d_head": 16, "attn_layer_indices": [5],
    }))
    from safetensors.torch import save_file

    for name in ("qwen35", "bamba"):
        save_file({"model.embed_tokens.weight": torch.zeros(64, 32)},
                  str(files / name / "model.safetensors"))
    locked = root / "locked"
    locked.mkdir()
    (locked / ".plait.lock").write_text(json.dumps(
        {"host": os.uname().nodename, "pid": os.getpid(), "start": "", "slurm_job": "",
         "since": 0}))
    run = root / "run"
    ran = run_module(TRAIN, _train("training.steps=2", "training.eval_every=0",
                                   out=str(run)), cwd=root)
    assert ran.code == 0, ran.text[-3000:]
    forged = root / "forged"
    _forge_wrong_shape(run / "checkpoints" / "step2", forged)
    forged_meta = root / "forged_meta"
    _forge_wrong_shape(run / "checkpoints" / "step2", forged_meta, in_meta_too=True)
    imported = root / "imported"
    _weights_only(run / "checkpoints" / "step2", imported)
    held = socket.socket()  # a port some other process listens on
    held.bind(("127.0.0.1", 0))
    held.listen()
    yield {"root": root, "files": files, "run": run, "locked": locked, "forged": forged,
           "forged_meta": forged_meta, "imported": imported / "step0",
           "port": held.getsockname()[1]}
    held.close()


def _forge_wrong_shape(src: Path, dst: Path, in_meta_too: bool = False) -> None:
    """A copy of checkpoint ``src`` whose first MLP weight has another shape, with meta.json's
    sizes and hashes and the completion marker recomputed: every integrity check passes
    (``in_meta_too``: meta.json's shape is forged to match, so only the model can tell)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    name = next(k for k in meta["index"] if k.startswith("blocks.0.mlp") and "::" not in k)
    shard = dst / meta["index"][name]
    tensors = load_file(str(shard))
    for key in (name, f"{name}::exp_avg", f"{name}::exp_avg_sq"):
        tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(shard), metadata={"format": "1"})
    data = shard.read_bytes()
    meta["files"][shard.name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if in_meta_too:
        meta["shapes"][name] = list(tensors[name].shape)
    text = json.dumps(meta, indent=1)
    (dst / "meta.json").write_text(text)
    (dst / "COMPLETE").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def _weights_only(src: Path, dst: Path) -> None:
    from safetensors.torch import load_file

    from plait.launcher import checkpoint
    from plait.launcher.config import config_from_dict

    meta = json.loads((src / "meta.json").read_text())
    state = {}
    for f in sorted(src.glob("shard-*.safetensors")):
        state.update({k: v for k, v in load_file(str(f)).items() if "::" not in k})
    cfg = config_from_dict(meta["config"], "meta.json")
    checkpoint.write_weights_only(dst, state, cfg.model, source="a test")


def _fill(text: str, world: dict, tmp: Path) -> str:
    return text.format(tmp=tmp, **{k: v for k, v in world.items() if k != "root"})


def _check(case: Case, world: dict, tmp: Path):
    args = [_fill(a, world, tmp) for a in case.args]
    watched = [Path(_fill(w, world, tmp)) for w in case.watch]
    before = {w: snapshot(w) for w in watched}
    env = {k: _fill(v, world, tmp) for k, v in case.env.items()}
    ran = run_module(case.module, args, cwd=tmp, env=env)
    assert ran.code == 2, f"exit {ran.code}\n{ran.text[-4000:]}"
    assert "Traceback" not in ran.out and "Traceback" not in ran.err, ran.text[-4000:]
    lines = [x for x in ran.err.splitlines() if x.strip()]
    assert len(lines) == 1, ran.err[-4000:]
    for want in case.expect:
        assert _fill(want, world, tmp) in lines[0], lines[0]
    for w in watched:
        assert snapshot(w) == before[w], f"{w} changed"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_exit_2_and_writes_nothing(case, world, tmp_path):
    _check(case, world, tmp_path)


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 30
    assert {c.module for c in CASES} == {PREP, TRAIN, PLAN, EVAL, EXPORT}


def test_plan_refuses_what_training_refuses_with_the_same_line(world, tmp_path):
    cases = {c.id: c for c in CASES}
    for train_id, plan_id in (("train-tp-does-not-divide-heads", "plan-tp-does-not-divide-heads"),
                              ("train-interleaved-one-micro-batch",
                               "plan-interleaved-one-micro-batch")):
        (tmp_path / train_id).mkdir()
        (tmp_path / plan_id).mkdir()
        a = _check(cases[train_id], world, tmp_path / train_id)
        b = _check(cases[plan_id], world, tmp_path / plan_id)
        assert a.removeprefix("train: ") == b.removeprefix("plan: ")


def test_the_runner_sees_a_traceback(tmp_path, monkeypatch):
    """The table's detectors are real: a command that lets a user error escape (the same bad
    input as train-missing-config, without the command's handler) shows a traceback and a
    code other than 2."""
    (tmp_path / "raise_it.py").write_text(
        "from plait.launcher.config import load_config\n"
        "load_config('/nonexistent.yaml')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ran = run_module("raise_it", [], cwd=tmp_path)
    assert ran.code == 1 and "Traceback" in ran.err and "ConfigError" in ran.err
