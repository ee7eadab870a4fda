"""Entry point: ``python -m plait.launcher.train --config configs/tiny.yaml [--set a.b=c ...]``.

Works unchanged under torchrun, the deepspeed launcher and srun (plait.parallel.runtime
reads each one's environment), on CPU (gloo, fp32) and CUDA (nccl, bf16).

Exit codes (what a Slurm template acts on):
    0   trained to ``training.steps``
    2   a user error: the config, or a checkpoint that does not fit this run (one line)
    3   too many skipped steps in a row (non-finite, or loss spikes with
        ``training.spike_zscore``; ``training.max_skipped_in_a_row``); a checkpoint of the
        last good weights was saved
    75  stopped early to be requeued: SIGUSR1 or SIGTERM (Slurm's ``--signal``), or a time
        limit (``training.time_limit``, ``SLURM_JOB_END_TIME``) within ``exit_margin``; a
        checkpoint was saved and ``checkpoint.resume: auto`` continues from it
An early stop also writes ``<out_dir>/stop.json`` (reason, step, exit code): torchrun turns
any failing worker's code into its own 1, so job scripts read the file there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

from plait.data.corpus import resolve_corpus
from plait.data.loader import BlendedSequences, PackedSequences, SequenceLoader, ShardedTokens
from plait.data.prepare import PrepareConfig, prepare_corpus
from plait.data.tokenizer import Tokenizer
from plait.models.common import build_model, letter, param_count
from plait.parallel import runtime
from plait.parallel.pipeline import PipelineRunner
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import logical_numel

from . import checkpoint
from .config import Config, ConfigError, load_config
from .engine import build_engine
from .loop import SpikeDetector, StepStats, run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plait.launcher.train", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set training.steps=50 (repeatable)",
    )
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints")


def build_data(cfg: Config, rt) -> tuple[Tokenizer, object, object | None]:
    """Tokenizer, training sequences and validation sequences (None if the split is too
    small). Without ``data.datasets`` rank 0 first prepares ``data.corpus`` into
    <out_dir>/data (reused when nothing changed) while the other ranks wait."""
    d = cfg.data
    dirs = list(d.datasets)
    if not dirs:
        auto = Path(cfg.out_dir) / "data"
        pc = PrepareConfig(
            source=resolve_corpus(d.corpus), out=str(auto), show_progress=rt.is_main,
            **dataclasses.asdict(d.prepare),
        )  # fmt: skip
        if rt.is_main:
            prepare_corpus(pc)
        runtime.barrier()
        dirs = [str(auto)]
    tok = Tokenizer(Path(dirs[0]) / "tokenizer.model")
    weights = list(d.weights) or [1.0] * len(dirs)

    def split(name: str, shuffle: bool):
        parts = []
        for i, path in enumerate(dirs):
            src = ShardedTokens(path, name, tok.sha256)
            if len(src) <= d.seq_len:
                return None
            parts.append(PackedSequences(src, d.seq_len, d.seed + i, shuffle=shuffle))
        return parts[0] if len(parts) == 1 else BlendedSequences(parts, weights, d.seed)

    train_set = split("train", shuffle=True)
    if train_set is None:
        raise ValueError(f"data.seq_len: {d.seq_len} is longer than a training split in {dirs}")
    return tok, train_set, split("val", shuffle=False)


def sequence_parallel_context(cfg: Config) -> SequenceParallel:
    """The context the model is built with, after the checks that would otherwise fail at
    some later step: every sequence length the run will use (the warmup's too) must split
    evenly over the context-parallel ranks in the chosen layout. Zigzag (ring attention's
    balanced layout) only when every letter runs in it."""
    zigzag_ok = all(letter(c).sequence_parallel.zigzag for c in set(cfg.model.pattern))
    sp = SequenceParallel.from_parallel_state(
        cfg.parallel.softmax_sp, zigzag=cfg.parallel.softmax_sp == "ring" and zigzag_ok
    )
    d = cfg.data
    lengths = [d.seq_len]
    if d.warmup_seq_len:
        doublings = (d.seq_len // d.warmup_seq_len).bit_length()
        lengths = [d.warmup_seq_len << i for i in range(doublings)]
    for length in lengths:
        try:
            sp.local_index(length)
        except ValueError as e:
            field = "data.seq_len" if length == d.seq_len else "data.warmup_seq_len"
            raise ConfigError(f"{field}: {e}".replace("data.seq_len: ", "")) from None
    return sp


def check_pipeline(cfg: Config) -> None:
    """What pipeline stages do not run with, refused at start-up with one line: the loss
    spike test needs the loss before the last backward (inside megatron's schedule here), and
    the passkey probe generates token by token through every stage."""
    if cfg.parallel.pipeline_parallel == 1:
        return
    t = cfg.training
    if t.spike_zscore:
        raise ConfigError("training.spike_zscore: loss-spike skipping does not run with "
                          "parallel.pipeline_parallel > 1 yet; set it to 0")  # fmt: skip
    if t.eval_passkey:
        raise ConfigError("training.eval_passkey: the passkey probe does not run with "
                          "parallel.pipeline_parallel > 1 yet; set it to 0")  # fmt: skip
    v, m = cfg.parallel.virtual_pipeline, t.grad_accum
    if v > 1 and m % cfg.parallel.pipeline_parallel:
        raise ConfigError(
            f"training.grad_accum: {m} micro-batches; the interleaved schedule "
            f"(parallel.virtual_pipeline={v}) needs a multiple of pipeline_parallel="
            f"{cfg.parallel.pipeline_parallel}"
        )
    chunks = cfg.parallel.pipeline_parallel * v
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


def build_stages(cfg: Config, rt, vocab_size: int, sp):
    """This rank's pipeline chunks: (the module DeepSpeed wraps, the chunks megatron's
    schedule runs). Each chunk is built from the first stage's RNG state, so every layer has
    the weights a single process gives it (at the cost of building, then dropping, the other
    stages' layers once at start-up)."""
    from plait.parallel.pipeline import (
        StageChunk,
        StageContainer,
        local_stages,
        shared_init_rng,
        transformer_config,
    )

    from .plan import stage_bounds

    bounds = stage_bounds(cfg, vocab_size)
    models = []
    for stage in local_stages(bounds, rt.pp, rt.pp_rank):
        with shared_init_rng():
            m = build_model(cfg.model, rt.tp, vocab_size=vocab_size, sp=sp, stage=stage)
        m.recompute = cfg.training.recompute
        models.append(m)
    p = cfg.parallel
    config = transformer_config(cfg.model.hidden_size, cfg.model.num_layers, p.tensor_parallel,
                                p.pipeline_parallel, p.context_parallel, p.virtual_pipeline,
                                None)  # fmt: skip
    chunks = [StageChunk(m, m.stage, config, c) for c, m in enumerate(models)]
    return StageContainer(models), chunks


EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
_SKIPPED_STOPS = ("non-finite", "loss spikes")


class _Preemption:
    """SIGUSR1 / SIGTERM only set a flag; the run acts on it at the next step boundary, once
    every rank agrees (an all-reduce), so no rank saves alone or dies mid-collective."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _deadline(cfg: Config, start: float) -> float:
    """When to stop and save: the earliest of this run's time limit and the Slurm job's end,
    less the exit margin (inf when neither is set)."""
    t = cfg.training
    limits = [start + t.time_limit] if t.time_limit else []
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    if end.isdigit():
        limits.append(float(end))
    return min(limits) - t.exit_margin if limits else float("inf")


def _has_checkpoint(cfg: Config) -> bool:
    """Whether ``resume`` will continue this run from a checkpoint (init_from then yields)."""
    c = cfg.checkpoint
    if c.resume == "never":
        return False
    if c.resume != "auto":
        return True
    return any(p.is_dir() for p in _checkpoint_dir(cfg).glob("step*"))


def _resume(cfg: Config, rt, engine, scheduler, loader, identity) -> dict | None:
    """Load the checkpoint ``checkpoint.resume`` asks for, if any; returns its meta."""
    c = cfg.checkpoint
    if c.resume == "never":
        return None
    # Rank 0 checks (hashing every file once, not once per rank) and tells the others.
    found: list = [None, [], ""]
    if rt.is_main:
        if c.resume == "auto":
            path, problems = checkpoint.find_resumable(_checkpoint_dir(cfg))
            found = [str(path) if path else None, problems, ""]
        else:
            why = (
                checkpoint.verify(Path(c.resume)) if Path(c.resume).is_dir() else "not a directory"
            )
            found = [c.resume, [], why]
    found = runtime.broadcast_object(found)
    if found[2]:
        raise checkpoint.CheckpointError(f"checkpoint.resume: {found[0]}: {found[2]}")
    path, problems = (Path(found[0]) if found[0] else None), found[1]
    if rt.is_main:
        for line in problems:
            print(f"checkpoint: {line}", flush=True)
    if path is None:
        return None
    meta = checkpoint.load(path, engine, scheduler, loader, cfg, rt, identity)
    if rt.is_main:
        how = f", resharded from {meta['layout']}" if meta["resharded"] else ""
        print(f"resumed from {path} at step {engine.global_steps}{how}", flush=True)
    return meta


def train(cfg: Config) -> tuple[list[StepStats], str]:
    """Train; returns the step history and why it stopped ("" when it reached the end,
    "preempted", "time limit", "non-finite" or "loss spikes")."""
    start = time.time()
    rt = runtime.initialize(
        cfg.parallel, cfg.training.seed, keep_cpu_heap=cfg.training.keeps_cpu_heap
    )
    preemption = _Preemption()
    saver = None
    try:
        tok, train_set, val_set = build_data(cfg, rt)
        sp = sequence_parallel_context(cfg)
        chunks = None
        if rt.pp > 1:
            model, chunks = build_stages(cfg, rt, tok.vocab_size, sp)
        else:
            model = build_model(cfg.model, rt.tp, vocab_size=tok.vocab_size, sp=sp)
            model.recompute = cfg.training.recompute
        if cfg.checkpoint.init_from and not _has_checkpoint(cfg):
            source = checkpoint.init_weights_from(Path(cfg.checkpoint.init_from), model,
                                                  partial=rt.pp > 1)  # fmt: skip
            if rt.is_main:
                print(f"initialised from {source}", flush=True)
        engine, _, scheduler = build_engine(model, cfg, rt)
        pipe = None
        if chunks is not None:
            pipe = PipelineRunner(
                chunks,
                engine,
                cfg.model.hidden_size,
                cfg.parallel.zero_stage,
                cfg.optimizer.grad_clip,
            )
        loader = SequenceLoader(train_set, cfg.training.micro_batch_size, rt.dp, rt.dp_rank)
        identity = checkpoint.run_identity(cfg, tok.sha256)
        meta = _resume(cfg, rt, engine, scheduler, loader, identity)
        spikes = SpikeDetector(cfg.training.spike_zscore, cfg.training.spike_window)
        spikes.load_state_dict((meta or {}).get("loop", {}).get("spikes", {}))
        saver = checkpoint.Saver(_checkpoint_dir(cfg), cfg, rt, identity)

        if rt.is_main:
            (Path(cfg.out_dir) / "stop.json").unlink(missing_ok=True)
            # under pipeline stages this rank holds one stage: count the whole model
            n_params = (param_count(cfg.model, tok.vocab_size) if rt.pp > 1
                        else logical_numel(model))  # fmt: skip
            print(
                f"plait: {cfg.model.pattern} ({cfg.model.num_layers} layers, "
                f"d={cfg.model.hidden_size}), "
                f"~{n_params / 1e6:.2f}M params, vocab {tok.vocab_size}, "
                f"{len(train_set)} train sequences of {cfg.data.seq_len} tokens; "
                f"world {rt.world_size} (tp {rt.tp} cp {rt.cp} dp {rt.dp}"
                f"{f', pp {rt.pp} x {cfg.parallel.virtual_pipeline} chunks' if rt.pp > 1 else ''}"
                f"), {rt.device}, "
                f"optimizer {cfg.optimizer.name}, ZeRO-{cfg.parallel.zero_stage}",
                flush=True,
            )
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

        deadline = _deadline(cfg, start)
        seen = {"skipped": engine.skipped_steps - spikes.skipped, "spikes": spikes.skipped,
                "in_a_row": 0}  # fmt: skip
        stopped = {"why": ""}

        def save(step: int) -> None:
            saver.save(step, engine, scheduler, loader, {"spikes": spikes.state_dict()})

        def on_step(s: StepStats) -> str:
            nonfinite = s.skipped_steps > seen["skipped"]
            spike = s.spike_skipped_steps > seen["spikes"]
            seen["in_a_row"] = seen["in_a_row"] + 1 if nonfinite or spike else 0
            if rt.is_main and nonfinite:
                print(f"step {s.step}: non-finite gradient norm, step skipped "
                      f"({s.skipped_steps} so far)", flush=True)  # fmt: skip
            if rt.is_main and spike:
                print(f"step {s.step}: loss {s.loss:.4f} is a spike (training.spike_zscore), "
                      f"step skipped ({s.spike_skipped_steps} so far)", flush=True)  # fmt: skip
            seen["skipped"], seen["spikes"] = s.skipped_steps, s.spike_skipped_steps
            flags = torch.tensor(
                [preemption.requested, time.time() > deadline,
                 seen["in_a_row"] >= cfg.training.max_skipped_in_a_row, saver.failed()],
                dtype=torch.float32,
            )  # fmt: skip
            runtime.all_reduce_max(flags)
            if flags[3]:
                saver.wait()  # raises, on every rank, what rank 0's writer raised
            why = ""
            if flags[2]:
                why = "loss spikes" if spike and not nonfinite else "non-finite"
            elif flags[0]:
                why = "preempted"
            elif flags[1]:
                why = "time limit"
            every = cfg.checkpoint.save_every
            if why or (every and s.step % every == 0) or s.step == cfg.training.steps:
                save(s.step)
            stopped["why"] = why
            return why

        history = run(engine, scheduler, cfg, rt, loader, val_set, on_step=on_step, sp=sp,
                      spikes=spikes, tokenizer=tok, pipe=pipe)  # fmt: skip
        saver.wait()  # the last checkpoint is complete before the run says it stopped
        if rt.is_main and stopped["why"]:
            # For job scripts: launchers such as torchrun report their own exit code.
            stop = {"reason": stopped["why"], "step": engine.global_steps,
                    "exit_code": EXIT_NONFINITE if stopped["why"] in _SKIPPED_STOPS
                    else EXIT_REQUEUE}  # fmt: skip
            (Path(cfg.out_dir) / "stop.json").write_text(json.dumps(stop) + "\n")
        return history, stopped["why"]
    finally:
        if saver is not None:
            saver.close()  # after an error: let rank 0's writer finish, no collective
        preemption.restore()
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cfg.parallel.check_trainable()
        check_pipeline(cfg)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        history, why = train(cfg)
    except (ConfigError, checkpoint.CheckpointError) as e:
        print(f"{'config' if isinstance(e, ConfigError) else 'checkpoint'} error: {e}",
              file=sys.stderr)  # fmt: skip
        return 2
    main_rank = os.environ.get("RANK", "0") == "0"
    if why in _SKIPPED_STOPS:
        spikes = " or a loss spike" if cfg.training.spike_zscore else ""
        if main_rank:
            print(
                f"stopped: {cfg.training.max_skipped_in_a_row} steps in a row had a non-finite "
                f"gradient norm{spikes}; the last good weights are saved in "
                f"{_checkpoint_dir(cfg)} (look at the data and the learning rate)",
                file=sys.stderr,
            )
        return EXIT_NONFINITE
    if why:
        if main_rank:
            print(f"stopped ({why}) at step {history[-1].step if history else '?'}: "
                  f"checkpoint saved, exit {EXIT_REQUEUE} to be requeued", flush=True)  # fmt: skip
        return EXIT_REQUEUE
    if history and main_rank:
        print(
            f"done: step {history[-1].step}, loss {history[0].loss:.4f} -> {history[-1].loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
