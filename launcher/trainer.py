"""A training run, from a loaded config to its outcome, in an order that keeps a run
directory trustworthy.

1. ``check_run`` (launcher/layout.py): the layout and the features, on every rank, before any
   process group: what training would refuse later is refused now, as ``plan`` refuses it.
2. Process groups (plait.parallel.runtime).
3. The run-directory lock (launcher/rundir.py): rank 0 takes ``<out_dir>/.plait.lock`` or the
   job is refused at once; a finished or refused run releases it.
4. The preflight, on rank 0 (verdict broadcast to every rank): the checkpoint ``resume``
   finds and whether it fits this run, field by field; whether the run has already reached
   ``training.steps`` (then it says so and exits 0); the data: prepared datasets present and
   longer than a sequence, the corpus present and, when resuming, still the one this run
   prepared; the ``init_from`` checkpoint complete. Nothing but the lock is written before
   this point.
5. The data: the corpus is prepared into ``<out_dir>/.tmp-data`` (an interrupted preparation
   resumes there) and checked against the sequence length; prepared datasets are opened.
6. The model (or this rank's pipeline stages), weights from ``init_from``, the engine, the
   resume (the checkpoint's tensors checked against the model first).
7. Commit: the staged data becomes ``<out_dir>/data``, ``config.json`` is written, and the
   loop runs, saving checkpoints at their steps and on a stop request.
A refusal (a ``UserError``) anywhere before 7 leaves ``out_dir`` as it was: the staged data is
removed, the lock released, and ``out_dir`` itself removed when the lock created it.

Stop requests (SIGUSR1, SIGTERM: Slurm's warning, ``scancel``) only set a flag; the run
acts at the next step boundary once every rank agrees. A request that arrives at the last
step, or after it, changes nothing: the run is finished and exits 0. From the end of the
loop to the process's exit both signals are ignored, so a late warning cannot kill a
finished job (the Slurm template would requeue it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from plait.data.corpus import resolve_corpus
from plait.data.loader import BlendedSequences, PackedSequences, SequenceLoader, ShardedTokens
from plait.data.prepare import MANIFEST, PrepareConfig, prepare_corpus, reusable
from plait.data.tokenizer import Tokenizer, TokenizerError, tokenizer_in
from plait.errors import UserError
from plait.models.common import build_model, param_count
from plait.parallel import runtime
from plait.parallel.pipeline import PipelineRunner
from plait.parallel.tensor_parallel import logical_numel

from . import checkpoint
from .config import Config, ConfigError
from .engine import build_engine
from .layout import check_run, sequence_parallel_context
from .loop import Loop, SpikeDetector, StepStats
from .rundir import RunLock

EXIT_NONFINITE = 3
EXIT_REQUEUE = 75
SKIPPED_STOPS = ("non-finite", "loss spikes")
STAGED_DATA = ".tmp-data"


@dataclass
class Outcome:
    history: list[StepStats] = field(default_factory=list)
    stopped: str = ""
    """Why the run stopped early: "" (it reached ``training.steps``), "preempted", "time
    limit", "non-finite" or "loss spikes"."""
    finished: str = ""
    """Set when the run had already finished before this process: the line that says so."""


@dataclass
class _Preflight:
    """Rank 0's verdict before anything is written (broadcast to every rank)."""

    resume: str | None = None
    problems: list[str] = field(default_factory=list)
    finished: str = ""
    init_from: str | None = None
    data_dirs: list[str] = field(default_factory=list)
    """Prepared datasets to open as they are; empty: the corpus is prepared (or reused)."""


class _Preemption:
    """SIGUSR1 / SIGTERM only set a flag; the run acts on it at the next step boundary, once
    every rank agrees (an all-reduce), so no rank saves alone or dies mid-collective."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def finished(self) -> None:
        """The run is over: a late stop request has nothing left to stop. SIG_IGN, not a
        Python handler, because the interpreter restores the default action of Python-level
        handlers while it shuts down, and a signal then would still kill the process."""
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Trainer:
    """One training run of ``cfg`` (see the module docstring for the order of its steps). It
    owns what the run builds: the runtime (``rt``), the model, the training loop (``loop``:
    engine, schedule, loader, spike detector, validation data), the checkpoint writer
    (``saver``) and the step-boundary counters (``step_end``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.out / "checkpoints")
        self.stage = self.out / STAGED_DATA
        self.staged = False  # this process prepared data into ``stage`` (not yet committed)
        self.rt = None
        self.model = None
        self.loop: Loop | None = None
        self.saver: checkpoint.Saver | None = None
        self.step_end: _StepEnd | None = None

    def run(self) -> Outcome:
        start = time.time()
        cfg = self.cfg
        check_run(cfg, runtime.read_launch_env().world_size)
        preemption = _Preemption()
        lock = RunLock(self.out)
        done = False
        try:
            self.rt = rt = runtime.initialize(cfg.parallel, cfg.training.seed,
                                              cpu_heap=cfg.training.cpu_heap)
            took_over = runtime.on_main(lock.acquire)
            if rt.is_main and took_over:
                print(f"train: {took_over}", flush=True)
            pre = runtime.on_main(self._preflight)
            if pre.finished:
                done = True
                return Outcome(finished=pre.finished)
            if rt.is_main:
                for line in pre.problems:
                    print(f"checkpoint: {line}", flush=True)
            outcome = self._train(rt, pre, preemption, start)
            done = True
            return outcome
        except UserError:
            if self.rt is not None and self.rt.is_main and self.staged:
                shutil.rmtree(self.stage, ignore_errors=True)
            raise
        finally:
            if self.saver is not None:
                self.saver.close()  # after an error: let rank 0's writer finish, no collective
            if done:
                preemption.finished()
            else:
                preemption.restore()
            if self.rt is not None and self.rt.is_main:
                lock.release()
            if self.rt is not None:
                runtime.shutdown()

    # ------------------------------------------------------------------ preflight (rank 0)

    def _preflight(self) -> _Preflight:
        cfg, c, pre = self.cfg, self.cfg.checkpoint, _Preflight()
        path, meta = None, None
        if c.resume == "auto":
            path, pre.problems = checkpoint.find_resumable(self.ckpt_dir)
        elif c.resume != "never":
            path = Path(c.resume)
            why = checkpoint.verify(path) if path.is_dir() else "not a checkpoint directory"
            if why:
                raise checkpoint.CheckpointError(f"checkpoint.resume: {path}: {why}")
        if path is not None:
            meta = checkpoint.read_meta(path)
            if meta["kind"] != "logical":
                raise checkpoint.CheckpointError(
                    f"checkpoint.resume: {path} is a {meta['kind']} checkpoint (no training "
                    "state); start a new run from it with checkpoint.init_from"
                )
        if meta is not None:  # the config, field by field, before the data is looked at
            checkpoint.check_fits(path, meta, checkpoint.run_identity(cfg, ""), c.allow_changes)
        sha = self._data_preflight(pre, meta is not None)
        if meta is not None:
            if sha:  # the tokenizer, where it is known before any preparation
                identity = checkpoint.run_identity(cfg, sha)
                checkpoint.check_fits(path, meta, identity, c.allow_changes)
            pre.resume = str(path)
            steps = cfg.training.steps
            if meta["global_steps"] >= steps:
                pre.finished = (
                    f"finished: step {meta['global_steps']} of {steps} ({path}); nothing to do "
                    "(raise training.steps to train on)"
                )
        elif c.init_from:
            pre.init_from = str(checkpoint.resolve_init(Path(c.init_from)))
        return pre

    def _data_preflight(self, pre: _Preflight, resuming: bool) -> str:
        """Check the data without writing; fill ``pre.data_dirs`` with prepared datasets to
        open as they are. Returns the tokenizer's sha256 when it is known before preparing
        ("" when the corpus will be prepared and a new tokenizer trained)."""
        d = self.cfg.data
        if d.datasets:
            toks = [self._dataset_tokenizer(i, path) for i, path in enumerate(d.datasets)]
            for i, (path, tok) in enumerate(zip(d.datasets, toks)):
                if tok.sha256 != toks[0].sha256:
                    raise ConfigError(
                        f"data.datasets[{i}]: {path} was tokenized with another tokenizer than "
                        f"{d.datasets[0]}; blended datasets need one tokenizer"
                    )
                self._check_split(Path(path), toks[0].sha256, f"data.datasets[{i}] ({path})")
            pre.data_dirs = list(d.datasets)
            return toks[0].sha256
        pc = self._prepare_config(self.out / "data")
        found = reusable(pc)
        if found is not None:
            self._check_split(self.out / "data", found["tokenizer_sha256"],
                              f"data.corpus ({pc.source})")
            pre.data_dirs = [str(self.out / "data")]
            return found["tokenizer_sha256"]
        if resuming and "data" not in self.cfg.checkpoint.allow_changes:
            old = self.out / "data" / MANIFEST
            if old.is_file():
                raise ConfigError(
                    f"data.corpus: {pc.source} is not what {old.parent} was prepared from "
                    "(its files, or that directory, changed since the checkpoint); the run "
                    "would prepare it again and train another tokenizer: restore the corpus, "
                    "or start a new run (another out_dir)"
                )
        if pc.tokenizer:
            try:
                return Tokenizer(pc.tokenizer).sha256
            except TokenizerError as e:
                raise ConfigError(f"data.prepare.tokenizer: {e}") from None
        return ""

    def _dataset_tokenizer(self, i: int, path: str) -> Tokenizer:
        where = f"data.datasets[{i}]"
        if not Path(path).is_dir():
            raise ConfigError(f"{where}: {path} is not a directory (prepare one with "
                              "python -m plait.data.prepare)")
        try:
            return Tokenizer(tokenizer_in(path))
        except TokenizerError as e:
            raise ConfigError(f"{where}: {e}") from None

    def _check_split(self, directory: Path, sha: str, what: str) -> None:
        seq_len = self.cfg.data.seq_len
        n = len(ShardedTokens(directory, "train", sha))
        if n <= seq_len:
            raise ConfigError(
                f"data.seq_len: {seq_len} tokens is longer than the training split of {what} "
                f"({n} tokens); use a shorter data.seq_len or more data"
            )

    def _prepare_config(self, out: Path) -> PrepareConfig:
        d = self.cfg.data
        return PrepareConfig(source=resolve_corpus(d.corpus), out=str(out),
                             show_progress=self.cfg.logging.progress_bar,
                             **dataclasses.asdict(d.prepare))

    # ------------------------------------------------------------------ data

    def _data(self, rt, pre: _Preflight) -> tuple[Tokenizer, object, object | None]:
        """Tokenizer, training and validation sequences (validation None when the split is
        too small). Without prepared datasets rank 0 prepares the corpus into the staging
        directory while the other ranks wait; the preflight has checked the rest."""
        d = self.cfg.data
        dirs = pre.data_dirs
        if not dirs:
            runtime.on_main(self._stage_corpus)
            dirs = [str(self.stage)]
            self.staged = True
        tok = Tokenizer(tokenizer_in(dirs[0]))
        weights = list(d.weights) or [1.0] * len(dirs)

        def split(name: str, shuffle: bool):
            parts = []
            for i, path in enumerate(dirs):
                src = ShardedTokens(path, name, tok.sha256)
                if len(src) <= d.seq_len:
                    return None
                parts.append(PackedSequences(src, d.seq_len, d.seed + i, shuffle=shuffle))
            return parts[0] if len(parts) == 1 else BlendedSequences(parts, weights, d.seed)

        return tok, split("train", shuffle=True), split("val", shuffle=False)

    def _stage_corpus(self) -> None:
        """Rank 0: prepare the corpus into the staging directory and check it against the
        sequence length; on a refusal the staging directory goes (nothing else was written)."""
        try:
            pc = self._prepare_config(self.stage)
            try:
                manifest = prepare_corpus(pc)
            except OSError as e:
                raise UserError(f"out_dir: cannot write {self.stage}: {e}") from None
            self._check_split(self.stage, manifest["tokenizer_sha256"],
                              f"data.corpus ({pc.source})")
        except UserError:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise

    def _commit_data(self, rt) -> None:
        """The staged preparation becomes ``<out_dir>/data`` (rank 0; the other ranks keep
        reading the files they opened, which a rename does not move)."""
        if not self.staged:
            return
        if rt.is_main:
            final = self.out / "data"
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.stage, final)
        self.staged = False
        runtime.barrier()

    # ------------------------------------------------------------------ training

    def _build(self, rt, tok: Tokenizer, sp, pre: _Preflight):
        cfg = self.cfg
        chunks = None
        if rt.pp > 1:
            model, chunks = build_stages(cfg, rt, tok.vocab_size, sp)
        else:
            model = build_model(cfg.model, rt.tp, vocab_size=tok.vocab_size, sp=sp)
            model.recompute = cfg.training.recompute
        if pre.init_from:
            source = checkpoint.init_weights_from(Path(pre.init_from), model, partial=rt.pp > 1)
            if rt.is_main:
                print(f"initialised from {source}", flush=True)
        engine, _, scheduler = build_engine(model, cfg, rt)
        pipe = None
        if chunks is not None:
            pipe = PipelineRunner(chunks, engine, cfg.model.hidden_size, cfg.parallel.zero_stage,
                                  cfg.optimizer.grad_clip)
        return model, engine, scheduler, pipe

    def _train(self, rt, pre: _Preflight, preemption: _Preemption, start: float):
        cfg = self.cfg
        tok, train_set, val_set = self._data(rt, pre)
        sp = sequence_parallel_context(cfg)
        model, engine, scheduler, pipe = self._build(rt, tok, sp, pre)
        loader = SequenceLoader(train_set, cfg.training.micro_batch_size, rt.dp, rt.dp_rank)
        identity = checkpoint.run_identity(cfg, tok.sha256)
        meta = None
        if pre.resume:
            meta = checkpoint.load(Path(pre.resume), engine, scheduler, loader, cfg, rt, identity)
            if rt.is_main:
                how = f", resharded from {meta['layout']}" if meta["resharded"] else ""
                print(f"resumed from {pre.resume} at step {engine.global_steps}{how}", flush=True)
        spikes = SpikeDetector(cfg.training.spike_zscore, cfg.training.spike_window)
        spikes.load_state_dict((meta or {}).get("loop", {}).get("spikes", {}))
        self.model = model
        self.saver = saver = checkpoint.Saver(self.ckpt_dir, cfg, rt, identity)

        self._commit_data(rt)
        if rt.is_main:
            (self.out / "stop.json").unlink(missing_ok=True)
            # under pipeline stages this rank holds one stage: count the whole model
            n_params = (param_count(cfg.model, tok.vocab_size) if rt.pp > 1
                        else logical_numel(model))
            pp = f", pp {rt.pp} x {cfg.parallel.virtual_pipeline} chunks" if rt.pp > 1 else ""
            print(
                f"plait: {cfg.model.pattern} ({cfg.model.num_layers} layers, "
                f"d={cfg.model.hidden_size}), ~{n_params / 1e6:.2f}M params, vocab "
                f"{tok.vocab_size}, {len(train_set)} train sequences of {cfg.data.seq_len} "
                f"tokens; world {rt.world_size} (tp {rt.tp} cp {rt.cp} dp {rt.dp}{pp}), "
                f"{rt.device}, optimizer {cfg.optimizer.name}, ZeRO-{cfg.parallel.zero_stage}",
                flush=True,
            )
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

        self.step_end = step_end = _StepEnd(cfg, rt, preemption, saver, spikes, engine,
                                            scheduler, loader, _deadline(cfg, start))
        self.loop = Loop(cfg, rt, engine, scheduler, loader, sp=sp, pipe=pipe, spikes=spikes,
                         val=val_set, tokenizer=tok)
        history = self.loop.run(on_step=step_end)
        saver.wait()  # the last checkpoint is complete before the run says it stopped
        why = step_end.why
        if rt.is_main and why:
            # For job scripts: launchers such as torchrun report their own exit code.
            code = EXIT_NONFINITE if why in SKIPPED_STOPS else EXIT_REQUEUE
            stop = {"reason": why, "step": engine.global_steps, "exit_code": code}
            (self.out / "stop.json").write_text(json.dumps(stop) + "\n")
        return Outcome(history, why)


class _StepEnd:
    """What happens at every step boundary (``loop.run``'s ``on_step``): count skipped steps,
    agree with every rank on the stop flags (a stop request, the time limit, too many
    skipped steps in a row, a failed asynchronous save), and save when a checkpoint is due.
    Returns why the run stops ("" to go on)."""

    def __init__(self, cfg: Config, rt, preemption: _Preemption, saver, spikes, engine,
                 scheduler, loader, deadline: float):
        self.cfg, self.rt, self.preemption, self.saver = cfg, rt, preemption, saver
        self.spikes, self.engine, self.scheduler, self.loader = spikes, engine, scheduler, loader
        self.deadline = deadline
        self.skipped = engine.skipped_steps - spikes.skipped
        self.spike_skips = spikes.skipped
        self.in_a_row = 0
        self.why = ""

    def __call__(self, s: StepStats) -> str:
        cfg, rt = self.cfg, self.rt
        nonfinite = s.skipped_steps > self.skipped
        spike = s.spike_skipped_steps > self.spike_skips
        self.in_a_row = self.in_a_row + 1 if nonfinite or spike else 0
        if rt.is_main and nonfinite:
            print(f"step {s.step}: non-finite gradient norm, step skipped "
                  f"({s.skipped_steps} so far)", flush=True)
        if rt.is_main and spike:
            print(f"step {s.step}: loss {s.loss:.4f} is a spike (training.spike_zscore), "
                  f"step skipped ({s.spike_skipped_steps} so far)", flush=True)
        self.skipped, self.spike_skips = s.skipped_steps, s.spike_skipped_steps
        flags = torch.tensor(
            [self.preemption.requested, time.time() > self.deadline,
             self.in_a_row >= cfg.training.max_skipped_in_a_row, self.saver.failed()],
            dtype=torch.float32,
        )
        runtime.all_reduce_max(flags)
        if flags[3]:
            self.saver.wait()  # raises, on every rank, what rank 0's writer raised
        last = s.step >= cfg.training.steps
        why = ""
        if flags[2]:
            why = "loss spikes" if spike and not nonfinite else "non-finite"
        elif (flags[0] or flags[1]) and not last:  # at the last step the run is finished
            why = "preempted" if flags[0] else "time limit"
        every = cfg.checkpoint.save_every
        if why or (every and s.step % every == 0) or last:
            self.saver.save(s.step, self.engine, self.scheduler, self.loader,
                            {"spikes": self.spikes.state_dict()})
        self.why = why
        return why


def _deadline(cfg: Config, start: float) -> float:
    """When to stop and save: the earliest of this run's time limit and the Slurm job's end,
    less the exit margin (inf when neither is set)."""
    t = cfg.training
    limits = [start + t.time_limit] if t.time_limit else []
    end = os.environ.get("SLURM_JOB_END_TIME", "")
    if end.isdigit():
        limits.append(float(end))
    return min(limits) - t.exit_margin if limits else float("inf")


def build_stages(cfg: Config, rt, vocab_size: int, sp):
    """This rank's pipeline chunks: (the module DeepSpeed wraps, the chunks megatron's
    schedule runs). Each chunk is built from the first stage's RNG state, so every layer has
    the weights a single process gives it (at the cost of building, then dropping, the other
    stages' layers once at start-up)."""
    from plait.parallel.pipeline import (
        StageChunk,
        StageContainer,
        shared_init_rng,
        transformer_config,
    )
    from plait.parallel.stages import local_stages

    from .planning import stage_bounds

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
                                None)
    chunks = [StageChunk(m, m.stage, config, c) for c, m in enumerate(models)]
    return StageContainer(models), chunks
