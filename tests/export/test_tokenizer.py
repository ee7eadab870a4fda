"""The exported tokenizer (tokenizer.json built from the sentencepiece model) encodes and
decodes exactly as sentencepiece does: BPE and unigram models (without user-defined symbols:
around those the dummy-prefix rule differs, docs/export.md), on the bundled corpus and on
text that exercises normalisation (NFKC, repeated and edge whitespace, tabs, newlines,
characters outside the vocabulary that fall back to bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.data.tokenizer import train_tokenizer
from plait.launcher.convert import hf_tokenizer

CORPUS = Path(__file__).resolve().parents[2] / "data" / "corpus" / "devils_dictionary.jsonl"
HARD = ["  two  spaces\tand tab\nnewline ", "naïve café 12345 ½ 𝔘nicode 😀", " lead", "",
        "ﬁ ligature Ｆｕｌｌ", "   ", "a\n\n b  ", "x" * 50]


@pytest.mark.parametrize("kind,symbols", [("bpe", ()), ("unigram", ())])
def test_hf_tokenizer_equals_sentencepiece(tmp_path, kind, symbols):
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    sp = train_tokenizer(texts[:400], tmp_path / "t.model", 600, kind, symbols)
    tok = hf_tokenizer(tmp_path / "t.model")
    tok.save_pretrained(str(tmp_path / "hf"))
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    bad = []
    for text in texts[400:700] + HARD:
        ids = sp.encode(text)
        if loaded(text, add_special_tokens=False)["input_ids"] != ids:
            bad.append(("encode", text[:40]))
        if loaded.decode(ids) != sp.decode(ids):
            bad.append(("decode", text[:40]))
    assert not bad, bad[:5]
    assert loaded.eos_token_id == sp.eos_id
