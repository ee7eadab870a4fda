"""Preparation: shards round trip, bad inputs named, counters, determinism across worker
counts, resume after an interruption, and ingestion of parquet through HF datasets."""

import json

import numpy as np
import pytest

from plait.data import prepare as prep
from plait.data.corpus import CorpusError
from plait.data.loader import ShardedTokens
from plait.data.prepare import PrepareConfig, prepare_corpus
from plait.data.shards import HEADER_SIZE, Shard, ShardError, write_shard

SHA = "ab" * 32


def _corpus(tmp_path, n=120, extra=b""):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 5)})
             for i in range(n)]
    lines.insert(7, json.dumps({"text": ""}))
    lines.insert(30, json.dumps({"text": "   "}))
    p.write_bytes(("\n".join(lines) + "\n").encode() + extra)
    return p


def _cfg(tmp_path, source, out="prep", **kw):
    base = dict(source=str(source), out=str(tmp_path / out), vocab_size=300, docs_per_shard=25,
                val_fraction=0.2, seed=3, show_progress=False)
    base.update(kw)
    return PrepareConfig(**base)


def test_shard_round_trip(tmp_path):
    docs = [np.array([1, 2, 3]), np.array([70000]), np.array([], dtype=np.int64), np.array([5])]
    write_shard(tmp_path / "s.bin", docs, SHA, np.uint32)
    s = Shard(tmp_path / "s.bin", SHA)
    assert s.tokens.tolist() == [1, 2, 3, 70000, 5]
    assert s.offsets.tolist() == [0, 3, 4, 4, 5]
    assert s.header.n_docs == 4 and s.header.dtype == np.uint32


def test_bad_shards_are_named(tmp_path):
    p = tmp_path / "s.bin"
    write_shard(p, [np.arange(100)], SHA, np.uint16)
    with pytest.raises(ShardError, match="tokenized with tokenizer abab"):
        Shard(p, "cd" * 32)
    raw = p.read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(ShardError, match="cut.bin: size .* truncated or corrupted"):
        Shard(tmp_path / "cut.bin")
    (tmp_path / "foreign.bin").write_bytes(b"GIF89a" + raw[6:])
    with pytest.raises(ShardError, match="foreign.bin: not a plait shard"):
        Shard(tmp_path / "foreign.bin")
    (tmp_path / "v9.bin").write_bytes(raw[:8] + (9).to_bytes(4, "little") + raw[12:])
    with pytest.raises(ShardError, match="v9.bin: shard format version 9"):
        Shard(tmp_path / "v9.bin")
    assert len(raw) == HEADER_SIZE + 8 * 2 + 200


def test_prepare_counts_splits_and_reuses(tmp_path):
    src = _corpus(tmp_path)
    m = prepare_corpus(_cfg(tmp_path, src))
    c = m["counters"]
    assert c["records"] == 122 and c["empty_dropped"] == 2
    assert c["documents"]["train"] + c["documents"]["val"] == 120
    assert 0 < c["documents"]["val"] < 50
    train = ShardedTokens(tmp_path / "prep", "train")
    assert len(train) == c["tokens"]["train"] and len(train.starts) == c["documents"]["train"]
    eos = m["eos_id"]
    stream = train.read(0, len(train))
    assert (np.flatnonzero(stream == eos) + 1)[:-1].tolist() == train.starts[1:].tolist()
    before = (tmp_path / "prep" / "manifest.json").stat().st_mtime_ns
    prepare_corpus(_cfg(tmp_path, src))  # unchanged: reused
    assert (tmp_path / "prep" / "manifest.json").stat().st_mtime_ns == before


def _shard_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.bin"))}


def test_two_workers_write_the_same_shards(tmp_path):
    src = _corpus(tmp_path)
    prepare_corpus(_cfg(tmp_path, src, out="one", workers=1))
    prepare_corpus(
        _cfg(
            tmp_path, src, out="two", workers=2, tokenizer=str(tmp_path / "one" / "tokenizer.model")
        )
    )
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")


def test_interrupted_preparation_resumes(tmp_path, monkeypatch):
    src = _corpus(tmp_path)
    prepare_corpus(_cfg(tmp_path, src, out="ref"))
    tok = str(tmp_path / "ref" / "tokenizer.model")
    real = prep.write_shard
    calls = {"n": 0}

    def flaky(path, docs, sha, dtype):
        calls["n"] += 1
        if calls["n"] == 5:  # third chunk's train shard: leave a partial .tmp and die
            path.with_name(path.name + ".tmp").write_bytes(b"PLAITSHD partial")
            raise KeyboardInterrupt
        return real(path, docs, sha, dtype)

    monkeypatch.setattr(prep, "write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(_cfg(tmp_path, src, out="run", tokenizer=tok))
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert not m["complete"] and len(m["chunks"]) == 2
    assert not (tmp_path / "run" / "train" / "shard-00002.bin").exists()
    with pytest.raises(ShardError, match="did not finish"):
        ShardedTokens(tmp_path / "run", "train")
    monkeypatch.setattr(prep, "write_shard", real)
    m = prepare_corpus(_cfg(tmp_path, src, out="run", tokenizer=tok))
    assert m["complete"] and m["counters"]["empty_dropped"] == 2
    assert _shard_bytes(tmp_path / "run") == _shard_bytes(tmp_path / "ref")


def test_undecodable_bytes(tmp_path):
    src = _corpus(tmp_path, n=10, extra=b'{"text": "bad \xff\xfe bytes"}\n')
    with pytest.raises(CorpusError, match=r"c.jsonl:13: undecodable UTF-8"):
        prepare_corpus(_cfg(tmp_path, src, vocab_size=280))
    m = prepare_corpus(_cfg(tmp_path, src, out="rep", vocab_size=320, on_decode_error="replace"))
    assert m["counters"]["undecodable_replaced_this_run"] >= 1


def test_tokenizer_mismatch_is_named(tmp_path):
    prepare_corpus(_cfg(tmp_path, _corpus(tmp_path)))
    with pytest.raises(ShardError, match="prepared with tokenizer"):
        ShardedTokens(tmp_path / "prep", "train", expect_tokenizer="00" * 32)


def test_parquet_through_hf_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i} of a parquet corpus, some words here" for i in range(40)] + [""]
    pq.write_table(pa.table({"content": texts}), tmp_path / "d.parquet")
    m = prepare_corpus(_cfg(tmp_path, tmp_path / "d.parquet", text_field="content", vocab_size=300))
    assert m["counters"]["records"] == 41 and m["counters"]["empty_dropped"] == 1


def test_directory_source_and_unknown_files(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"text": "alpha beta gamma " * 20}) + "\n")
    (d / "b.txt").write_text("a whole text file is one document " * 20)
    m = prepare_corpus(_cfg(tmp_path, d, vocab_size=300, val_fraction=0.0))
    assert m["counters"]["documents"]["train"] == 2
    with pytest.raises(CorpusError, match="no such file or directory"):
        prepare_corpus(_cfg(tmp_path, tmp_path / "missing"))


def test_long_documents_train_the_tokenizer(tmp_path):
    """sentencepiece skips every training sentence over 4192 bytes: a corpus of one long line
    had nothing to train on (an INTERNAL error blamed on the vocabulary size), and a corpus
    of books trained its tokenizer on none of them. Long documents are cut at whitespace
    for the tokenizer's sample (tokenized whole for the shards)."""
    from plait.data.tokenizer import MAX_SENTENCE_BYTES, Tokenizer, training_pieces

    words = [f"w{i % 500}ord{i % 7}" for i in range(100_000)]  # ~0.9 MB, one line
    text = " ".join(words)
    pieces = training_pieces(text)
    assert len(pieces) > 100 and " ".join(pieces) == text
    assert max(len(p.encode()) for p in pieces) <= MAX_SENTENCE_BYTES
    glued = "x" * 10_000  # no whitespace at all: cut anyway, nothing lost
    assert "".join(training_pieces(glued)) == glued
    assert training_pieces("short") == ["short"]
    src = tmp_path / "one_line.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n")
    m = prepare_corpus(_cfg(tmp_path, src, vocab_size=400, val_fraction=0.0))
    tok = Tokenizer(tmp_path / "prep" / "tokenizer.model")
    assert tok.sp.piece_to_id("ord") != tok.sp.unk_id()  # a merge learnt from the long line
    assert m["counters"]["documents"]["train"] == 1


def test_an_hf_tokenizer_json_prepares_like_sentencepiece(tmp_path):
    """A released checkpoint's tokenizer.json (here a small byte-level BPE with Qwen's special
    tokens): the prepared directory keeps it as tokenizer.json, every document ends with its
    <|endoftext|>, the tokens decode back to the documents, and it is reused unchanged; a
    tokenizer.json without an end-of-document token is refused in one line."""
    from plait.data.tokenizer import Tokenizer, TokenizerError, tokenizer_in
    from tests.export.test_qwen35_cli import qwen_like_tokenizer

    src = _corpus(tmp_path)
    tj = qwen_like_tokenizer(tmp_path / "tokenizer.json", vocab=300)
    m = prepare_corpus(_cfg(tmp_path, src, tokenizer=str(tj), workers=2))
    out = tmp_path / "prep"
    tok = Tokenizer(tokenizer_in(out))
    assert tokenizer_in(out).name == m["tokenizer"] == "tokenizer.json"
    assert tok.kind == "tokenizers" and m["eos_id"] == tok.eos_id == 0
    train = ShardedTokens(out, "train", tok.sha256)
    stream = train.read(0, len(train)).tolist()
    first = stream[: train.starts[1] if len(train.starts) > 1 else len(stream)]
    assert first[-1] == tok.eos_id
    assert tok.decode(first[:-1]).startswith("document ")
    texts = [json.loads(x)["text"] for x in src.read_text().splitlines()]
    assert tok.decode(first[:-1]) in texts
    before = (out / "manifest.json").stat().st_mtime_ns
    prepare_corpus(_cfg(tmp_path, src, tokenizer=str(tj)))
    assert (out / "manifest.json").stat().st_mtime_ns == before

    bare = json.loads(tj.read_text())
    bare["added_tokens"] = []
    bare["model"]["vocab"] = {k: v for k, v in bare["model"]["vocab"].items() if "<|" not in k}
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    with pytest.raises(TokenizerError, match="no end-of-document token"):
        Tokenizer(tmp_path / "bare.json")
