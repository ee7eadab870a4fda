"""Continued pretraining of a released Bamba checkpoint, as a user runs it: a directory in the
release's layout (a tiny ``BambaForCausalLM`` saved by transformers, with a Llama-3-style
tokenizer.json whose documents end with ``<|end_of_text|>``) is imported with ``python -m
plait.launcher.export --from-hf``; a run prepares the bundled corpus with that tokenizer.json,
starts from the import under context parallelism (CP=2: LASP-2 with per-token decays over
packed documents, which the release's own code refuses), and its loss falls; the trained run
exports back to the native layout, whose self-check loads it in transformers without remote
code and without plait (tests/export/release_cli.py)."""

from __future__ import annotations

from plait.data.tokenizer import Tokenizer
from tests.export.release_cli import byte_bpe_tokenizer, import_train_export
from tests.models.test_mamba2 import release_model


def test_import_train_and_export_a_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]  # Llama 3's, Bamba's tokenizer
    tok = Tokenizer(byte_bpe_tokenizer(release / "tokenizer.json", specials))
    assert tok.kind == "tokenizers" and tok.eos_token == "<|end_of_text|>"
    release_model(0, vocab_size=tok.vocab_size).save_pretrained(str(release))
    config = import_train_export(tmp_path, release, tok.eos_id, "DRDD")
    assert config["model_type"] == "bamba" and config["architectures"] == ["BambaForCausalLM"]
    assert config["time_step_limit"] == [0.0, {"__float__": "Infinity"}]  # as transformers writes
