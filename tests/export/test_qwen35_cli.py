"""Continued pretraining of a released Qwen3.5 checkpoint, as a user runs it: a directory in
the release's layout (a tiny ``Qwen3_5ForCausalLM`` saved by transformers, with an HF
tokenizer.json whose documents end with ``<|endoftext|>``) is imported with ``python -m
plait.launcher.export --from-hf``; a run prepares the bundled corpus with that tokenizer.json,
starts from the import under context parallelism (CP=2), and its loss falls; the trained run
exports back to the native layout, whose self-check loads it in transformers without remote
code and without plait (tests/export/release_cli.py)."""

from __future__ import annotations

from pathlib import Path

from plait.data.tokenizer import Tokenizer
from tests.export.release_cli import byte_bpe_tokenizer, import_train_export
from tests.models.test_gdn import release_model

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_like_tokenizer(path: Path, vocab: int = 512) -> Path:
    """A byte-level BPE tokenizer.json with Qwen's special tokens (the released one has
    248,320 entries)."""
    return byte_bpe_tokenizer(path, QWEN_SPECIALS, vocab)


def test_import_train_and_export_a_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    tok = Tokenizer(qwen_like_tokenizer(release / "tokenizer.json"))
    assert tok.kind == "tokenizers" and tok.eos_token == "<|endoftext|>"
    release_model(0, vocab_size=tok.vocab_size).save_pretrained(str(release))
    config = import_train_export(tmp_path, release, tok.eos_id, "GGGQ")
    assert config["model_type"] == "qwen3_5_text"
    assert config["architectures"] == ["Qwen3_5ForCausalLM"]
