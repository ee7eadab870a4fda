"""Continued pretraining of a released Bamba checkpoint, as a user runs it: a directory in the
release's layout (a tiny ``BambaForCausalLM`` saved by transformers, with a Llama-3-style
tokenizer.json whose documents end with ``<|end_of_text|>``) is imported with ``python -m
plait.launcher.export --from-hf``; a run prepares the bundled corpus with that tokenizer.json,
starts from the import under context parallelism (CP=2: LASP-2 with per-token decays over
packed documents, which the release's own code refuses), and its loss falls; the trained run
exports back to the native layout, whose self-check loads it in transformers without remote
code and without plait."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from plait.data.corpus import BUNDLED_CORPUS
from plait.data.tokenizer import Tokenizer
from tests.export.test_export import _export
from tests.launcher.test_train_job import _metrics, _run
from tests.models.test_mamba2 import release_model

REPO = Path(__file__).resolve().parents[2]


def llama3_like_tokenizer(path: Path, vocab: int = 512) -> Path:
    """A byte-level BPE tokenizer.json with Llama 3's document tokens (Bamba's tokenizer; the
    released one has 128,256 entries, the format is the same)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    with BUNDLED_CORPUS.open() as f:
        texts = [json.loads(line)["text"] for line in f][:300]
    tk.train_from_iterator(texts, trainer)
    tk.save(str(path))
    return path


def test_import_train_and_export_a_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    tok = Tokenizer(llama3_like_tokenizer(release / "tokenizer.json"))
    assert tok.kind == "tokenizers" and tok.eos_token == "<|end_of_text|>"
    model = release_model(0, vocab_size=tok.vocab_size)
    model.save_pretrained(str(release))  # config.json and model.safetensors, as released

    ckpt = tmp_path / "imported"
    proc = _export("--from-hf", str(release), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((ckpt / "step0" / "meta.json").read_text())
    assert meta["model"]["pattern"] == "DRDD" and (ckpt / "step0" / "tokenizer.json").is_file()

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["model"] = meta["model"]
    config["out_dir"] = str(tmp_path / "run")
    config["data"]["seq_len"] = 64
    config["data"]["prepare"] = {"tokenizer": str(ckpt / "step0" / "tokenizer.json"),
                                 "val_fraction": 0.05}
    config["training"].update(steps=20, eval_every=0, micro_batch_size=4)
    config["optimizer"].update(lr=1e-2, warmup_steps=2)
    config["parallel"]["context_parallel"] = 2
    config["checkpoint"] = {"init_from": str(ckpt)}
    config["logging"]["progress_bar"] = False
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = _run(["--config", str(tmp_path / "run.yaml")], nproc=2)
    assert "initialised from" in proc.stdout
    prepared = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert prepared["tokenizer"] == "tokenizer.json" and prepared["eos_id"] == tok.eos_id
    loss = {s: r["loss"] for s, r in _metrics(tmp_path / "run").items()}
    assert sum(loss[s] for s in (18, 19, 20)) < sum(loss[s] for s in (1, 2, 3)) - 0.2, loss

    out = tmp_path / "hf"
    proc = _export("--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export check: passed" in proc.stdout, proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bamba" and "auto_map" not in config
    assert config["architectures"] == ["BambaForCausalLM"]
    assert config["time_step_limit"] == [0.0, {"__float__": "Infinity"}]  # as transformers writes
    assert (out / "tokenizer.json").is_file() and not (out / "modeling_plait.py").exists()
