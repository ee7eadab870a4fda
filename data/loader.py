"""Fixed-length packed sequences, in a deterministic order addressed by a global sample counter.

The token stream is cut into windows of seq_len + 1 tokens (inputs and shifted labels,
stride seq_len). Sample ``g`` of the run is window ``perm_e[g mod n]`` of epoch
``e = g div n``, where ``perm_e`` is a permutation drawn from (seed, e). A global batch is a
contiguous range of sample numbers; each (micro step, data-parallel rank) takes a slice of it.
So the loader's whole state is one integer (samples consumed), which makes resume exact and
the samples seen independent of the data-parallel size.
"""

from __future__ import annotations

import numpy as np
import torch


class PackedSequences:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(
                f"data.seq_len: {seq_len} is too long for a split of {len(tokens)} tokens "
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

    def sample(self, g: int) -> np.ndarray:
        start = self._window(g) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)


class SequenceLoader:
    """Micro batches for one data-parallel rank.

    Micro step j of a step starting at global sample ``base`` gives rank r the samples
    base + j * micro * dp + r * micro + [0, micro).
    """

    def __init__(
        self,
        data: PackedSequences,
        micro_batch_size: int,
        dp_size: int,
        dp_rank: int,
        consumed_samples: int = 0,
    ):
        self.data = data
        self.micro = micro_batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.consumed_samples = consumed_samples

    def next_micro_batch(self) -> dict[str, torch.Tensor]:
        first = self.consumed_samples + self.dp_rank * self.micro
        rows = np.stack([self.data.sample(first + i) for i in range(self.micro)])
        self.consumed_samples += self.micro * self.dp_size
        t = torch.from_numpy(rows)
        return {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous()}

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
