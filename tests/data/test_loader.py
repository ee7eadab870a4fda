"""The loader: sample order, DP independence, exact resume, blending, boundaries, warmup."""

import numpy as np
import pytest
import torch

from plait.data.loader import (
    ArrayTokens,
    BlendedSequences,
    PackedSequences,
    SequenceLoader,
    boundaries,
    warmup_length,
    warmup_reshape,
)

EOS = 0


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


@pytest.mark.parametrize("stop", [1, 2, 5])
def test_resume_at_any_sample(ds, stop):
    full, _ = _collect(ds, micro=4, dp=2, steps=6)
    first, consumed = _collect(ds, micro=4, dp=2, steps=stop)
    rest, _ = _collect(ds, micro=4, dp=2, steps=6 - stop, start=consumed)
    assert first + rest == full


def test_labels_are_shifted_inputs_and_epochs_reshuffle(ds):
    b = SequenceLoader(ds, 4, 1, 0).next_micro_batch()
    assert (b["tokens"][:, 1:] == b["labels"][:, :-1]).all()
    n = len(ds)
    epoch0 = [ds.sample(g)["tokens"][0] for g in range(n)]
    epoch1 = [ds.sample(g)["tokens"][0] for g in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_long_sequences():
    tokens = np.random.default_rng(0).integers(1, 100, 2_100_000).astype(np.uint16)
    ds = PackedSequences(ArrayTokens(tokens, EOS), seq_len=1 << 20, seed=0)
    s = ds.sample(1)
    assert s["tokens"].shape == (2**20 + 1,) and s["doc_ids"].shape == (2**20,)


def test_boundaries_follow_documents():
    # documents: [5 6 7 EOS] [8 EOS] [9 9 9 9 EOS] ...
    docs = [[5, 6, 7], [8], [9, 9, 9, 9], [4, 4]]
    stream = np.concatenate([np.array(d + [EOS]) for d in docs]).astype(np.uint16)
    src = ArrayTokens(stream, EOS)
    doc_ids, pos = boundaries(src.doc_starts(2, 2 + 8), 2, 8)
    # tokens 2..9 are: 7 EOS | 8 EOS | 9 9 9 9
    assert doc_ids.tolist() == [0, 0, 1, 1, 2, 2, 2, 2]
    assert pos.tolist() == [0, 1, 0, 1, 0, 1, 2, 3]


def test_blending_proportions_and_resume():
    a = PackedSequences(np.full(10_000, 1, dtype=np.uint16), 4, seed=0)
    b = PackedSequences(np.full(10_000, 2, dtype=np.uint16), 4, seed=1)
    c = PackedSequences(np.full(10_000, 3, dtype=np.uint16), 4, seed=2)
    blend = BlendedSequences([a, b, c], [0.5, 0.3, 0.2], seed=7)
    picks = np.array([blend.sample(g)["tokens"][0] for g in range(5000)])
    frac = [(picks == k).mean() for k in (1, 2, 3)]
    assert frac == pytest.approx([0.5, 0.3, 0.2], abs=0.01)
    # every dataset index is used once, in order, whatever the interleaving
    seen = {0: [], 1: [], 2: []}
    for g in range(3000):
        d, i = blend.locate(g)
        seen[d].append(i)
    assert all(v == list(range(len(v))) for v in seen.values())
    with pytest.raises(ValueError, match="data.weights"):
        BlendedSequences([a, b], [1.0], seed=0)


def test_warmup_schedule_and_reshape():
    assert [warmup_length(s, 16, 128, 8) for s in range(10)] == [
        16,
        16,
        32,
        32,
        64,
        64,
        128,
        128,
        128,
        128,
    ]
    assert warmup_length(0, 0, 128, 8) == 128
    stream = np.concatenate([np.array([7] * 5 + [EOS]) for _ in range(40)]).astype(np.uint16)
    ds = PackedSequences(ArrayTokens(stream, EOS), seq_len=16, seed=0)
    batch = SequenceLoader(ds, 2, 1, 0).next_micro_batch()
    short = warmup_reshape(batch, 4)
    assert short["tokens"].shape == (8, 4)
    assert torch.equal(short["tokens"].reshape(2, 16), batch["tokens"])
    assert (short["positions"][:, 0] == 0).all() and (short["doc_ids"][:, 0] == 0).all()
    with pytest.raises(ValueError, match="does not divide"):
        warmup_reshape(batch, 5)


def test_seq_len_too_long_is_named():
    with pytest.raises(ValueError, match="data.seq_len: 50 is too long"):
        PackedSequences(np.arange(20), seq_len=50, seed=0)
