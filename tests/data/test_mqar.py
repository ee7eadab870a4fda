"""The MQAR generator: every query's label is the value paired with its key earlier on."""

import pytest
import torch

from plait.data.mqar import mqar_accuracy, mqar_batch


def test_labels_are_the_recalled_values():
    b = mqar_batch(4, 64, 128, num_pairs=8, num_queries=10, seed=0)
    for row in range(4):
        toks, labels, mask = b["tokens"][row], b["labels"][row], b["loss_mask"][row]
        pairs = {int(toks[i]): int(toks[i + 1]) for i in range(0, 16, 2)}
        assert len(pairs) == 8 and all(k < 64 <= v for k, v in pairs.items())
        queries = torch.nonzero(mask).flatten()
        assert len(queries) == 10 and (queries >= 16).all()
        for p in queries.tolist():
            assert pairs[int(toks[p])] == int(labels[p])
        assert (toks[16:][mask[16:] == 0] == 0).all()


def test_accuracy_counts_only_queries():
    b = mqar_batch(2, 32, 64, num_pairs=4, num_queries=5, seed=1)
    perfect = torch.nn.functional.one_hot(b["labels"], 64).float()
    assert mqar_accuracy(perfect, b) == 1.0
    assert mqar_accuracy(torch.zeros(2, 32, 64), b) == 0.0  # argmax 0 is never a value


def test_impossible_settings_are_named():
    with pytest.raises(ValueError, match="do not fit seq_len 10"):
        mqar_batch(1, 10, 64, num_pairs=4, num_queries=5, seed=0)
