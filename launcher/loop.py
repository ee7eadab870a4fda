"""The training loop: steps, validation, logging. Nothing else lives here.

Per optimizer step it runs ``grad_accum`` micro steps through the DeepSpeed engine and
reports loss (mean over micro steps and data-parallel replicas), learning rate, global
gradient norm, step time and tokens per second to the console (a progress bar on rank 0),
to TensorBoard and to ``metrics.jsonl`` in the run directory. With
``training.spike_zscore`` it skips the optimizer step of a loss spike (``SpikeDetector``).
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from plait.data.loader import PackedSequences, SequenceLoader, warmup_length, warmup_reshape
from plait.parallel.finite import any_rank, poisoned
from plait.parallel.pipeline import (
    PipelineRunner,
    from_last_stage,
    names_over_pipeline,
    sum_over_pipeline,
)
from plait.parallel.runtime import Runtime, data_parallel_mean
from plait.parallel.stages import bubble_fraction

from .config import Config
from .faults import nan_injected, spike_injected


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time_s: float
    tokens_per_s: float
    skipped_steps: int = 0
    """Optimizer steps skipped so far for a non-finite gradient norm (all ranks agree)."""
    spike_skipped_steps: int = 0
    """Optimizer steps skipped so far for a loss spike (``training.spike_zscore``)."""
    parts: dict[str, float] = field(default_factory=dict)
    """The model's own loss parts and gauges (``HybridLM.metrics``: lm_loss, moh_balance,
    seqboat_active), averaged like the loss; logged as train/<name>."""


class SpikeDetector:
    """Loss-spike test: a step's loss is a spike when it is more than ``zscore`` standard
    deviations above the mean of the last ``window`` accepted steps' losses (population
    standard deviation; the test starts once the window is full). Skipped steps, for a spike
    or a non-finite gradient, never enter the window, so a burst of spikes is measured
    against the losses before it. ``zscore`` 0 turns it off. Its state (the window and the
    count) goes into checkpoints, so a resumed run takes the same decisions."""

    def __init__(self, zscore: float, window: int):
        self.zscore = zscore
        self.losses: deque[float] = deque(maxlen=window)
        self.skipped = 0

    @property
    def active(self) -> bool:
        return self.zscore > 0

    def is_spike(self, loss: float) -> bool:
        if not self.active or len(self.losses) < self.losses.maxlen:
            return False
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        return loss > mean + self.zscore * std  # False for NaN: a non-finite skip instead

    def accept(self, loss: float) -> None:
        """A step that was taken: its loss joins the window."""
        if math.isfinite(loss):
            self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state.get("losses", []))
        self.skipped = state.get("skipped", 0)


class MetricsSink:
    """Rank 0's outputs: TensorBoard scalars and a JSON-lines log. Other ranks write nothing."""

    def __init__(self, cfg: Config, rt: Runtime):
        self.active = rt.is_main
        self.writer = None
        self.jsonl = None
        if not self.active:
            return
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.jsonl = open(out / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        if not self.active:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _local(b: dict[str, torch.Tensor], sp, masking: bool = True) -> dict[str, torch.Tensor]:
    """This context-parallel rank's tokens of every sequence, in the scheme's layout
    (contiguous for LASP-2, zigzag for ring attention in all-softmax models); positions and
    document ids stay global. Without document masking (``masking=False``) a row is one
    sequence: its positions are the window's indices, so a rank's chunk continues the
    previous rank's (the model's own default, arange of the local length, would restart
    them on every rank)."""
    if not masking:
        T = b["tokens"].shape[1]
        b = {**b, "positions": torch.arange(T).expand_as(b["tokens"])}
    if sp is None or sp.world == 1:
        return b
    index = sp.local_index(b["tokens"].shape[1])
    return {k: v[:, index].contiguous() for k, v in b.items()}


def _forward(model, b: dict[str, torch.Tensor], cfg: Config) -> torch.Tensor:
    """Loss of one micro batch (this rank's tokens; DeepSpeed averages over DP x CP ranks,
    which hold equal token counts); document boundaries go to the model unless disabled."""
    doc_ids = b["doc_ids"] if cfg.data.document_masking else None
    return model(b["tokens"], labels_BT=b["labels"], positions_BT=b["positions"],
                 doc_ids_BT=doc_ids)


class PipelineForward:
    """``model(tokens, positions_BT=..., doc_ids_BT=...)`` for evaluation under pipeline
    stages: one micro batch through every stage (megatron's schedule, forward only); the
    logits on the last stage, None elsewhere (plait.launcher.evaluation counts only the ranks
    that have them)."""

    def __init__(self, pipe: PipelineRunner):
        self.pipe = pipe

    def __call__(self, tokens, labels_BT=None, positions_BT=None, doc_ids_BT=None):
        b = {"tokens": tokens, "positions": positions_BT}
        if doc_ids_BT is not None:
            b["doc_ids"] = doc_ids_BT

        def forward(chunk, b):
            out = chunk(b["tokens"], positions_BT=b["positions"], doc_ids_BT=b.get("doc_ids"))
            return {"logits": out} if chunk.stage.last else out

        # The interleaved schedule needs at least pipeline_parallel micro-batches: the batch
        # is run that many times then (validation only; the first copy's logits are used).
        copies = self.pipe.pp if self.pipe.virtual > 1 else 1
        out = self.pipe.run([b] * copies, forward, tokens.shape[1] * self.pipe.cp,
                            forward_only=True)
        return out[0]["logits"] if out else None


@dataclass
class Loop:
    """What the training loop runs on, built by the Trainer (launcher/trainer.py) or a
    benchmark: the engine with its schedule and loader, and the optional parts (the
    sequence-parallel context, the pipeline stages, the loss-spike detector, the validation
    sequences and the tokenizer for the passkey probe)."""

    cfg: Config
    rt: Runtime
    engine: Any
    scheduler: Any
    loader: SequenceLoader
    sp: Any = None
    pipe: PipelineRunner | None = None
    spikes: SpikeDetector | None = None
    val: PackedSequences | None = None
    tokenizer: Any = None

    def step(self) -> StepStats:
        """One optimizer step (under pipeline stages, through megatron's schedule)."""
        return self._pipeline_step() if self.pipe is not None else self._step()

    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This step's ``grad_accum`` micro batches, at the warmup's length, this rank's
        tokens, on the device."""
        d, t = self.cfg.data, self.cfg.training
        length = warmup_length(self.engine.global_steps, d.warmup_seq_len, d.seq_len,
                               d.warmup_seq_len_steps)
        out = []
        for _ in range(t.grad_accum):
            full = warmup_reshape(self.loader.next_micro_batch(), length)
            out.append(_to_device(_local(full, self.sp, d.document_masking), self.rt.device))
        return out

    def _stats(self, lr: float, loss: float, dt: float, parts: dict, skipped: int,
               spikes: int) -> StepStats:
        """The step's record: both step forms end here."""
        gn = self.engine.get_global_grad_norm()
        gn = float(gn.item() if torch.is_tensor(gn) else (gn if gn is not None else float("nan")))
        t = self.cfg.training
        tokens = t.micro_batch_size * t.grad_accum * self.rt.dp * self.cfg.data.seq_len
        return StepStats(self.engine.global_steps, loss, lr, gn, dt, tokens / dt, skipped,
                         spikes, parts)

    def _pipeline_step(self) -> StepStats:
        """Every stage reads the same ``grad_accum`` micro batches (the first needs the
        tokens, the last the labels, all the positions and document ids), megatron's schedule
        runs them, the engine reduces and steps once. The loss and the model's parts come
        from the last stage (auxiliary losses: every stage's share, added up), averaged over
        DP x CP, and every rank gets them."""
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        batches = self._micro_batches()
        seq_len = batches[0]["tokens"].shape[1] * self.rt.cp
        parts: dict[str, float] = {}
        shares = []  # the auxiliary losses of chunks before the last (HybridLM.stage_loss)

        def forward(chunk, b):
            out = _forward(chunk, b, self.cfg)
            for k, v in chunk.module.metrics.items():
                parts[k] = parts.get(k, 0.0) + float(v) / len(batches)
            if not chunk.stage.last and chunk.module.stage_loss is not None:
                shares.append(float(chunk.module.stage_loss) / len(batches))
            return out

        outs = self.pipe.run(batches, forward, seq_len)
        self.pipe.step()
        loss = torch.stack([o["loss"] for o in outs]).mean() if outs else torch.zeros(())
        loss = loss + sum(shares)
        names = names_over_pipeline(list(parts))
        local = torch.tensor([float(loss), *(parts.get(n, 0.0) for n in names)])
        local = data_parallel_mean(local)
        total = sum_over_pipeline(dict(zip(["", *names], local.tolist())), ["", *names])
        loss = total.pop("")
        dt = time.perf_counter() - t0
        dt = from_last_stage(torch.tensor([dt], dtype=torch.float64)).item()
        return self._stats(lr, loss, dt, total, self.engine.skipped_steps, 0)

    def _step(self) -> StepStats:
        """With an active spike detector every rank learns the step's loss before the last
        backward (it is known after the last forward) and all agree whether it is a spike; a
        spike's last loss is poisoned (parallel/finite.py) so that the optimizer step is
        skipped as a non-finite one would be."""
        engine, spikes, rank = self.engine, self.spikes, self.rt.rank
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        losses = []
        parts: dict[str, list[torch.Tensor]] = {}
        skipped_before, spike = engine.skipped_steps, False
        batches = self._micro_batches()
        for micro, b in enumerate(batches):
            loss = _forward(engine, b, self.cfg)
            if nan_injected(engine.global_steps + 1, rank):
                loss = loss * float("nan")
            if spike_injected(engine.global_steps + 1, rank):
                loss = loss * 10.0
            value = loss.detach().float()
            if spikes is not None and spikes.active and micro == len(batches) - 1:
                step_loss = data_parallel_mean(torch.stack([*losses, value]).mean()).item()
                spike = any_rank(spikes.is_spike(step_loss))
                if spike:
                    loss = poisoned(loss)
            engine.backward(loss)
            engine.step()
            losses.append(value)
            for k, v in getattr(engine.module, "metrics", {}).items():
                parts.setdefault(k, []).append(v.float())
        loss = data_parallel_mean(torch.stack(losses).mean()).item()
        means = {k: data_parallel_mean(torch.stack(v).mean()).item()
                 for k, v in sorted(parts.items())}
        if spike:
            if engine.skipped_steps == skipped_before:  # the NaN path did not skip: never silent
                raise RuntimeError(f"step {engine.global_steps}: a loss spike was not skipped")
            spikes.skipped += 1
        elif spikes is not None and spikes.active and engine.skipped_steps == skipped_before:
            spikes.accept(loss)
        n_spikes = spikes.skipped if spikes is not None else 0
        dt = time.perf_counter() - t0
        return self._stats(lr, loss, dt, means, engine.skipped_steps - n_spikes, n_spikes)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation over the first ``eval_batches`` micro batches of every DP rank (fixed
        order): ``loss`` (the mean over every token), the loss by position bucket
        (``loss_pos_<p>``: positions from p to the next power of two, as
        plait.launcher.evaluate reports; their count-weighted mean is ``loss``) and, with
        ``training.eval_passkey`` and a tokenizer, passkey accuracy at the training length
        (``passkey@<depth>``)."""
        from .evaluation import passkey_accuracy, position_loss

        cfg, rt, engine, t = self.cfg, self.rt, self.engine, self.cfg.training
        engine.eval()
        model = PipelineForward(self.pipe) if self.pipe is not None else engine
        r = position_loss(model, None, cfg.data.seq_len, t.micro_batch_size, t.eval_batches,
                          rt, self.sp, cfg.data.document_masking, windows=self.val)
        out = {"loss": r.mean}
        for a, m in zip(r.edges[:-1], r.bucket_means()):
            if m is not None:
                out[f"loss_pos_{a}"] = m
        if t.eval_passkey and self.tokenizer is not None and self.pipe is None:
            for depth in (0.0, 0.5, 1.0):  # (PP: refused at start-up)
                try:
                    out[f"passkey@{depth}"] = passkey_accuracy(
                        engine, self.tokenizer, cfg.data.seq_len, depth, t.eval_passkey, rt,
                        self.sp,
                    )
                except ValueError:  # the training length is too short for the prompt
                    break
        engine.train()
        return out

    def run(self, on_step=None) -> list[StepStats]:
        """Train from ``engine.global_steps`` to ``training.steps``. ``on_step(stats)`` runs
        after each step (checkpoints, preemption, fault handling) and stops the run by
        returning a reason (any true value)."""
        cfg, rt, engine = self.cfg, self.rt, self.engine
        sink = MetricsSink(cfg, rt)
        p = cfg.parallel
        # the pipeline's idle fraction, shown beside tokens/s (the interleaved formula with v > 1)
        idle = bubble_fraction(p.pipeline_parallel, cfg.training.grad_accum, p.virtual_pipeline)
        bubble = {"bubble": f"{idle:.0%}"} if self.pipe else {}
        history: list[StepStats] = []
        bar = tqdm(total=cfg.training.steps, initial=engine.global_steps, desc="train",
                   unit="step", disable=not (rt.is_main and cfg.logging.progress_bar),
                   dynamic_ncols=True)
        try:
            while engine.global_steps < cfg.training.steps:
                s = self.step()
                history.append(s)
                if s.step % cfg.logging.log_every == 0 or s.step == cfg.training.steps:
                    row = {k: v for k, v in asdict(s).items() if k not in ("step", "parts")}
                    sink.scalars(s.step, {**row, **s.parts}, "train")
                bar.update(1)
                bar.set_postfix(loss=f"{s.loss:.3f}", lr=f"{s.lr:.2e}", gnorm=f"{s.grad_norm:.2f}",
                                tok_s=f"{s.tokens_per_s:.0f}", **bubble)
                every = cfg.training.eval_every
                last = s.step == cfg.training.steps
                if self.val is not None and every and (s.step % every == 0 or last):
                    vals = self.evaluate()
                    sink.scalars(s.step, vals, "val")
                    if rt.is_main:
                        bar.write(f"step {s.step}: train loss {s.loss:.4f}  val loss "
                                  f"{vals['loss']:.4f}")
                if on_step is not None and on_step(s):
                    break
        finally:
            bar.close()
            sink.close()
        return history
