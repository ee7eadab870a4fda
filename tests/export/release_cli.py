"""Continued pretraining of a released checkpoint through the real commands, shared by the
released-class families' CLI tests (test_qwen35_cli.py, test_bamba_cli.py): import the
release directory with ``--from-hf``, prepare the bundled corpus with its tokenizer.json,
train 20 steps from the import under CP=2 (the loss must fall), export back natively (the
self-check loads it in transformers without remote code and without plait)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from plait.data.corpus import BUNDLED_CORPUS
from tests.export.test_export import _export
from tests.launcher.test_train_job import _metrics, _run

REPO = Path(__file__).resolve().parents[2]


def byte_bpe_tokenizer(path: Path, special_tokens: list[str], vocab: int = 512) -> Path:
    """A byte-level BPE tokenizer.json with a release's special tokens, trained on the
    bundled corpus (released ones have 100K+ entries; the format is the same)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    with BUNDLED_CORPUS.open() as f:
        texts = [json.loads(line)["text"] for line in f][:300]
    tk.train_from_iterator(texts, trainer)
    tk.save(str(path))
    return path


def import_train_export(tmp_path: Path, release: Path, eos_id: int, pattern: str) -> dict:
    """Run the three commands on ``release`` (config.json, safetensors, tokenizer.json);
    returns the exported config.json after checking what every release shares."""
    ckpt = tmp_path / "imported"
    proc = _export("--from-hf", str(release), "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((ckpt / "step0" / "meta.json").read_text())
    assert meta["model"]["pattern"] == pattern and (ckpt / "step0" / "tokenizer.json").is_file()

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
    assert prepared["tokenizer"] == "tokenizer.json" and prepared["eos_id"] == eos_id
    loss = {s: r["loss"] for s, r in _metrics(tmp_path / "run").items()}
    assert sum(loss[s] for s in (18, 19, 20)) < sum(loss[s] for s in (1, 2, 3)) - 0.2, loss

    out = tmp_path / "hf"
    proc = _export("--checkpoint", str(tmp_path / "run" / "checkpoints"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export check: passed" in proc.stdout, proc.stdout
    exported = json.loads((out / "config.json").read_text())
    assert "auto_map" not in exported
    assert (out / "tokenizer.json").is_file() and not (out / "modeling_plait.py").exists()
    return exported
