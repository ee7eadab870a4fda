"""Training sequences: fixed-length windows over packed documents, addressed by a global
sample counter.

* Sources: ``ShardedTokens`` (one split of a prepared dataset: its shards, memory-mapped,
  checked against the run's tokenizer) or ``ArrayTokens`` (an in-memory token array whose
  documents end with EOS). Both give token ranges and document starts.
* ``PackedSequences``: the stream cut into windows of seq_len + 1 tokens (inputs and shifted
  labels, stride seq_len; any length, 2K to 1M tokens). Sample g is window perm_e[g mod n] of
  epoch e = g div n, with perm_e drawn from (seed, e). Each sample carries ``doc_ids`` (which
  document each input token belongs to) and ``positions`` (restarting at every document),
  which the model uses to reset states and mask attention between packed documents.
* ``BlendedSequences``: several sources by weight. Every block of 1024 global samples holds
  exactly round(w_d * 1024) samples of dataset d (largest remainders), in a seeded order, so
  proportions are exact per block and sample g maps to (dataset, index) in O(block).
* ``SequenceLoader``: micro step j of a step starting at global sample ``base`` gives DP
  rank r the samples base + j * micro * dp + r * micro + [0, micro). Its whole state is one
  integer, so resume is exact and the samples seen do not depend on the DP size.
* ``warmup_reshape``: sequence-length warmup without dropping tokens: a batch [B, L] becomes
  [B * L / l, l]; rows are separate sequences (documents and positions restart per row).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .shards import Shard, ShardError


class ArrayTokens:
    """An in-memory token stream; a document starts after every EOS."""

    def __init__(self, tokens: np.ndarray, eos_id: int | None = None):
        self.tokens = tokens
        ends = np.flatnonzero(np.asarray(tokens) == eos_id) if eos_id is not None else []
        self.starts = np.concatenate([[0], np.asarray(ends, dtype=np.int64) + 1])

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, a: int, b: int) -> np.ndarray:
        return np.asarray(self.tokens[a:b], dtype=np.int64)

    def doc_starts(self, a: int, b: int) -> np.ndarray:
        return self.starts[np.searchsorted(self.starts, a) : np.searchsorted(self.starts, b)]


class ShardedTokens:
    """One split (train/val) of a prepared dataset directory, as one token stream."""

    def __init__(self, directory: str | Path, split: str, expect_tokenizer: str | None = None):
        directory = Path(directory)
        mpath = directory / "manifest.json"
        if not mpath.is_file():
            raise ShardError(f"{directory}: no manifest.json (prepare it with plait.data.prepare)")
        self.manifest = json.loads(mpath.read_text())
        if not self.manifest.get("complete"):
            raise ShardError(f"{mpath}: preparation did not finish; rerun it to resume")
        if expect_tokenizer and self.manifest["tokenizer_sha256"] != expect_tokenizer:
            raise ShardError(
                f"{mpath}: prepared with tokenizer {self.manifest['tokenizer_sha256'][:12]}..., "
                f"the run uses {expect_tokenizer[:12]}..."
            )
        sha = self.manifest["tokenizer_sha256"]
        self.shards = []
        for ch in self.manifest["chunks"]:
            s = Shard(directory / ch[split]["file"], sha)
            if s.header.n_tokens != ch[split]["tokens"] or s.header.n_docs != ch[split]["docs"]:
                raise ShardError(f"{s.path}: header disagrees with {mpath}")
            if s.header.n_tokens:
                self.shards.append(s)
        sizes = [len(s) for s in self.shards]
        self.bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.starts = np.concatenate(
            [
                np.asarray(s.offsets[:-1], dtype=np.int64) + b
                for s, b in zip(self.shards, self.bounds)
            ]
            or [np.zeros(0, dtype=np.int64)]
        )

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, a: int, b: int) -> np.ndarray:
        i = int(np.searchsorted(self.bounds, a, side="right")) - 1
        parts = []
        while a < b:
            s, base = self.shards[i], int(self.bounds[i])
            end = min(b, int(self.bounds[i + 1]))
            parts.append(np.asarray(s.tokens[a - base : end - base], dtype=np.int64))
            a, i = end, i + 1
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def doc_starts(self, a: int, b: int) -> np.ndarray:
        return self.starts[np.searchsorted(self.starts, a) : np.searchsorted(self.starts, b)]


def boundaries(starts: np.ndarray, a: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """doc_ids and positions of the L tokens from a, given the document starts in [a, a+L)."""
    flags = np.zeros(L, dtype=np.int64)
    flags[starts - a] = 1
    flags[0] = 1
    doc_ids = np.cumsum(flags) - 1
    idx = np.where(flags == 1, np.arange(L), 0)
    positions = np.arange(L) - np.maximum.accumulate(idx)
    return doc_ids, positions


class PackedSequences:
    def __init__(self, source, seq_len: int, seed: int, shuffle: bool = True):
        if isinstance(source, np.ndarray):
            source = ArrayTokens(source)
        self.source = source
        self.seq_len = seq_len
        self.n = (len(source) - 1) // seq_len
        if self.n < 1:
            raise ValueError(
                f"data.seq_len: {seq_len} is too long for a split of {len(source)} tokens "
                "(need at least seq_len + 1)"
            )
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def _window(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def sample(self, g: int) -> dict[str, np.ndarray]:
        a = self._window(g) * self.seq_len
        L = self.seq_len
        doc_ids, positions = boundaries(self.source.doc_starts(a, a + L), a, L)
        return {
            "tokens": self.source.read(a, a + L + 1),
            "doc_ids": doc_ids,
            "positions": positions,
        }


class BlendedSequences:
    BLOCK = 1024

    def __init__(self, datasets: list[PackedSequences], weights: list[float], seed: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("data.weights: give one weight per dataset")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"data.weights: {weights} must be >= 0 with a positive sum")
        exact = w / w.sum() * self.BLOCK
        counts = np.floor(exact).astype(np.int64)
        for i in np.argsort(-(exact - counts))[: self.BLOCK - counts.sum()]:
            counts[i] += 1
        self.datasets, self.counts, self.seed = datasets, counts, seed
        self._slots = np.repeat(np.arange(len(datasets)), counts)
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def locate(self, g: int) -> tuple[int, int]:
        block, j = divmod(g, self.BLOCK)
        if self._cache is None or self._cache[0] != block:
            order = np.random.default_rng([self.seed, block]).permutation(self._slots)
            self._cache = (block, order)
        order = self._cache[1]
        d = int(order[j])
        return d, block * int(self.counts[d]) + int((order[:j] == d).sum())

    def sample(self, g: int) -> dict[str, np.ndarray]:
        d, i = self.locate(g)
        return self.datasets[d].sample(i)


class SequenceLoader:
    def __init__(
        self, data, micro_batch_size: int, dp_size: int, dp_rank: int, consumed_samples: int = 0
    ):
        self.data = data
        self.micro = micro_batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.consumed_samples = consumed_samples

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro
        rows = [self.data.sample(first + i) for i in range(self.micro)]
        self.consumed_samples += self.micro * self.dp_size
        tokens = torch.from_numpy(np.stack([r["tokens"] for r in rows]))
        return {
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "doc_ids": torch.from_numpy(np.stack([r["doc_ids"] for r in rows])),
            "positions": torch.from_numpy(np.stack([r["positions"] for r in rows])),
        }

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def warmup_length(step: int, start: int, final: int, steps: int) -> int:
    """Sequence length at optimizer step ``step``: doubling from ``start`` to ``final`` over
    ``steps`` steps (powers-of-two multiples of ``start`` that divide ``final``)."""
    if not start or step >= steps or start >= final:
        return final
    doublings = int(np.log2(final // start))
    k = min(doublings, int(step * (doublings + 1) // steps))
    return start * 2**k


def warmup_reshape(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """[B, L] -> [B * L / length, length]; each new row is its own sequence."""
    B, L = batch["tokens"].shape
    if length == L:
        return batch
    if L % length:
        raise ValueError(f"data.warmup_seq_len: {length} does not divide seq_len {L}")
    out = {k: v.reshape(-1, length) for k, v in batch.items()}
    rows = out["doc_ids"]
    flags = torch.ones_like(rows)
    flags[:, 1:] = (rows[:, 1:] != rows[:, :-1]).long()
    out["doc_ids"] = flags.cumsum(1) - 1
    idx = torch.where(flags == 1, torch.arange(length).expand_as(rows), torch.zeros_like(rows))
    out["positions"] = torch.arange(length) - idx.cummax(1).values
    return out
