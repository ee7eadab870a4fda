"""One check of a run's parallel layout and features, before any process group or model.

``check_run`` is what ``python -m plait.launcher.plan`` and training (and evaluation) both
call on the loaded config, before anything starts: it refuses, with one line naming the
field, every layout that training would otherwise refuse later (a model that does not split,
a sequence that does not cut, a schedule that does not run), so the planner never prints a
plan that training rejects and a job never fails at step 1 on every rank.

What it checks (each from the config alone; the letters declare what they need through
their mixers' ``tp_split`` and ``halo``, models/common/family.py):
- the world size, when known, is a multiple of tp x pp x cp;
- tensor parallelism divides every count a letter splits (heads, channels), the MLP's inner
  width and the vocabulary padding;
- context parallelism: every sequence length the run uses (``data.seq_len`` and each length
  of the sequence-length warmup) splits evenly over the ranks (twice as many chunks in
  ring attention's zigzag layout), and each rank's chunk holds the halo every letter needs
  from the rank before (a sliding window's ``window - 1`` keys, a short convolution's taps);
- pipeline stages: at most one stage per layer, ``|`` marks that agree with
  pipeline_parallel x virtual_pipeline, micro-batches the interleaved schedule accepts, no
  ZeRO-3, and none of the features that do not run under stages yet.
"""

from __future__ import annotations

from plait.models.common import letter
from plait.parallel.sequence import SequenceParallel

from .config import Config, ConfigError


def sequence_lengths(cfg: Config) -> list[int]:
    """Every sequence length the run trains at: the warmup's doublings, then ``seq_len``."""
    d = cfg.data
    if not d.warmup_seq_len:
        return [d.seq_len]
    doublings = (d.seq_len // d.warmup_seq_len).bit_length()
    return [d.warmup_seq_len << i for i in range(doublings)]


def zigzag(cfg: Config) -> bool:
    """Whether the context-parallel layout is ring attention's zigzag: only when the scheme
    is ring and every letter runs in that layout (letters that pass states or halos from
    rank to rank need contiguous chunks)."""
    every = all(letter(c).zigzag for c in set(cfg.model.pattern))
    return cfg.parallel.softmax_sp == "ring" and every


def check_run(cfg: Config, world: int | None = None) -> None:
    """Refuse, with one line naming the field, a run that the layout or the features cannot
    train (see the module docstring). ``world``: the number of ranks, when known."""
    p = cfg.parallel
    try:
        p.check_trainable()
        if world is not None:
            p.data_parallel(world)
    except ValueError as e:
        raise ConfigError(f"parallel.{e}") from None
    _check_tensor_parallel(cfg)
    for length in sequence_lengths(cfg):
        check_sequence_length(cfg, length, "data.seq_len" if length == cfg.data.seq_len
                              else "data.warmup_seq_len")
    _check_pipeline(cfg)


def _check_tensor_parallel(cfg: Config) -> None:
    tp, m = cfg.parallel.tensor_parallel, cfg.model
    if tp == 1:
        return
    for i, c in enumerate(m.pattern):
        for field, count in letter(c).mixer.tp_split(m, i).items():
            if count % tp:
                raise ConfigError(
                    f"parallel.tensor_parallel: {tp} does not divide the {count} heads or "
                    f"channels that layer {i} ({c}) splits over its ranks ({field}); choose a "
                    "tensor_parallel that divides it"
                )
    if m.ffn_size % tp:
        raise ConfigError(
            f"parallel.tensor_parallel: {tp} ranks cannot split the MLP's {m.ffn_size} inner "
            "units (model.ffn_hidden_size) evenly"
        )
    if m.vocab_multiple % tp:
        raise ConfigError(
            f"model.vocab_multiple: {m.vocab_multiple} is not a multiple of "
            f"parallel.tensor_parallel={tp} (the padded vocabulary is split over the ranks)"
        )


def check_sequence_length(cfg: Config, length: int, field: str) -> None:
    """A sequence of ``length`` tokens under the run's context parallelism: it cuts evenly
    into the ranks' chunks and every chunk holds each letter's halo."""
    cp = cfg.parallel.context_parallel
    if cp == 1:
        return
    parts = 2 * cp if zigzag(cfg) else cp
    if length % parts:
        how = ", zigzag" if parts > cp else ""
        raise ConfigError(
            f"{field}: {length} tokens cannot be split evenly into {parts} chunks "
            f"(parallel.context_parallel={cp}{how})"
        )
    chunk = length // parts
    for i, c in enumerate(cfg.model.pattern):
        needs, tokens = letter(c).mixer.halo(cfg.model, i)
        if tokens > chunk:
            raise ConfigError(
                f"{field}: {length} tokens over context_parallel={cp} leave {chunk} tokens per "
                f"rank, fewer than the {tokens} that layer {i} ({c}, {needs}) needs from the "
                f"rank before; use a longer sequence or a smaller context_parallel"
            )


def _check_pipeline(cfg: Config) -> None:
    """What pipeline stages do not run with: the loss spike test needs the loss before the
    last backward (inside megatron's schedule here), and the passkey probe generates token
    by token through every stage; the interleaved schedule needs a multiple of
    pipeline_parallel micro-batches."""
    p, t = cfg.parallel, cfg.training
    if p.pipeline_parallel == 1:
        return
    if t.spike_zscore:
        raise ConfigError("training.spike_zscore: loss-spike skipping does not run with "
                          "parallel.pipeline_parallel > 1 yet; set it to 0")
    if t.eval_passkey:
        raise ConfigError("training.eval_passkey: the passkey probe does not run with "
                          "parallel.pipeline_parallel > 1 yet; set it to 0")
    v, m = p.virtual_pipeline, t.grad_accum
    if v > 1 and m % p.pipeline_parallel:
        raise ConfigError(
            f"training.grad_accum: {m} micro-batches; the interleaved schedule "
            f"(parallel.virtual_pipeline={v}) needs a multiple of pipeline_parallel="
            f"{p.pipeline_parallel}"
        )
    chunks = p.pipeline_parallel * v
    marks = cfg.model.pipeline_marks
    if marks and len(marks) + 1 != chunks:
        raise ConfigError(
            f"model.pattern: {len(marks) + 1} stages marked with '|' but pipeline_parallel x "
            f"virtual_pipeline = {chunks}"
        )
    if chunks > cfg.model.num_layers:
        raise ConfigError(
            f"parallel.pipeline_parallel: {chunks} stages (x virtual_pipeline) for "
            f"{cfg.model.num_layers} layers; at most one stage per layer"
        )


def sequence_parallel_context(cfg: Config) -> SequenceParallel:
    """The context a model is built with, once the process groups exist (``check_run`` has
    refused the lengths that would not split)."""
    return SequenceParallel.from_parallel_state(cfg.parallel.softmax_sp, zigzag=zigzag(cfg))
