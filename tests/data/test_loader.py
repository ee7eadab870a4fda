"""Data: preparation cache, corpus errors, the loader's order, DP independence and resume."""

import json

import numpy as np
import pytest

from plait.data.config import DataConfig
from plait.data.corpus import CorpusError, read_documents
from plait.data.loader import PackedSequences, SequenceLoader
from plait.data.prepare import prepare


def _collect(ds, micro, dp, steps, accum=1, start=0):
    """Samples (as tuples) seen per optimizer step, over all DP ranks."""
    loaders = [SequenceLoader(ds, micro, dp, r, consumed_samples=start) for r in range(dp)]
    seen = []
    for _ in range(steps):
        step = []
        for _ in range(accum):
            for ld in loaders:
                step += [tuple(row) for row in ld.next_micro_batch()["tokens"].tolist()]
        seen.append(sorted(step))
    return seen, loaders[0].consumed_samples


@pytest.fixture
def ds():
    return PackedSequences(np.arange(1000, dtype=np.uint16), seq_len=7, seed=3)


def test_same_samples_regardless_of_dp_size(ds):
    a, _ = _collect(ds, micro=8, dp=1, steps=5)
    b, _ = _collect(ds, micro=4, dp=2, steps=5)
    c, _ = _collect(ds, micro=2, dp=2, steps=5, accum=2)
    d, _ = _collect(ds, micro=1, dp=4, steps=5, accum=2)
    assert a == b == c == d


def test_resume_at_any_sample(ds):
    full, _ = _collect(ds, micro=4, dp=2, steps=6)
    first, consumed = _collect(ds, micro=4, dp=2, steps=3)
    rest, _ = _collect(ds, micro=4, dp=2, steps=3, start=consumed)
    assert first + rest == full


def test_labels_are_shifted_inputs_and_epochs_reshuffle(ds):
    ld = SequenceLoader(ds, 4, 1, 0)
    b = ld.next_micro_batch()
    assert (b["tokens"][:, 1:] == b["labels"][:, :-1]).all()
    n = len(ds)
    epoch0 = [ds.sample(g)[0] for g in range(n)]
    epoch1 = [ds.sample(g)[0] for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_seq_len_too_long_is_named():
    with pytest.raises(ValueError, match="data.seq_len: 50 is too long"):
        PackedSequences(np.arange(20), seq_len=50, seed=0)


def test_prepare_caches_and_reuses(tmp_path):
    corpus = tmp_path / "c.jsonl"
    docs = [f"document number {i} says hello to the tokenizer." * 3 for i in range(60)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + '{"text": ""}\n')
    cfg = DataConfig(corpus=str(corpus), vocab_size=320, val_fraction=0.2, seed=1)
    p1 = prepare(cfg, tmp_path / "w", show_progress=False)
    mtime = p1.train_path.stat().st_mtime_ns
    p2 = prepare(cfg, tmp_path / "w", show_progress=False)
    assert p2.train_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert p1.meta["documents"]["empty_dropped"] == 1
    assert p1.meta["documents"]["train"] + p1.meta["documents"]["val"] == 60
    train, val = p1.load("train"), p1.load("val")
    eos = p1.tokenizer.eos_id
    assert int((train == eos).sum()) == p1.meta["documents"]["train"]
    assert int((val == eos).sum()) == p1.meta["documents"]["val"]
    # decoding the first document back gives its text
    first = train[: int(np.argmax(train == eos))].tolist()
    assert p1.tokenizer.decode(first) in docs
    # a changed split setting rebuilds
    p3 = prepare(
        DataConfig(corpus=str(corpus), vocab_size=320, val_fraction=0.5, seed=1),
        tmp_path / "w",
        show_progress=False,
    )
    assert p3.meta["documents"]["val"] != p1.meta["documents"]["val"]


@pytest.mark.parametrize(
    "content,needle",
    [
        (b'{"text": "ok"}\n{"txt": "x"}\n', ":2: no field 'text'"),
        (b'{"text": "ok"}\nnot json\n', ":2: not valid JSON"),
        (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', ":2: not valid UTF-8"),
        (b'{"text": 5}\n', ":1: field 'text' is not a string"),
    ],
)
def test_corpus_errors_name_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(CorpusError) as e:
        list(read_documents(p))
    assert str(p) in str(e.value) and needle in str(e.value)


def test_too_small_vocab_is_named(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "some text here"}) + "\n")
    with pytest.raises(ValueError, match="data.vocab_size=100: sentencepiece training failed"):
        prepare(DataConfig(corpus=str(corpus), vocab_size=100), tmp_path / "w", show_progress=False)
