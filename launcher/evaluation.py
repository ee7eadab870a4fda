"""Long-context evaluation of a trained checkpoint (``python -m plait.launcher.evaluate``,
whose help says what is reported): the measures (loss by position bucket, passkey, MQAR),
which training's validation also uses, and the evaluation run with its outputs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from megatron.core.tensor_parallel import (
    gather_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

from plait.data.loader import PackedSequences, SequenceLoader, ShardedTokens
from plait.data.mqar import mqar_batch
from plait.data.passkey import passkey_batch
from plait.data.tokenizer import Tokenizer, TokenizerError, tokenizer_in
from plait.models.common import build_model
from plait.parallel import runtime
from plait.parallel.tensor_parallel import tp_rank_and_size

from . import checkpoint
from .config import Config, ConfigError, config_from_dict, load_config, parse_override
from .layout import check_run, sequence_parallel_context
from .rundir import check_writable_dir

# ----------------------------------------------------------------------------- measures


def bucket_edges(length: int) -> list[int]:
    """[0, 1, 2, 4, ..., length]: bucket b holds positions edges[b] <= p < edges[b + 1]."""
    edges = [0, 1]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return edges + [length] if length > 1 else [0, 1]


@dataclass
class PositionLoss:
    length: int
    edges: list[int]
    loss_sum: list[float]
    count: list[int]
    tokens_per_s: float = 0.0

    @property
    def mean(self) -> float:
        return sum(self.loss_sum) / max(sum(self.count), 1)

    def bucket_means(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.loss_sum, self.count)]


def _global_index(length: int, sp) -> torch.Tensor:
    """The sequence positions this context-parallel rank holds (all of them on one rank)."""
    if sp is None or sp.world == 1:
        return torch.arange(length)
    return sp.local_index(length)


def _tp_leader() -> bool:
    """TP ranks compute the same per-token values: only the first one counts them."""
    return tp_rank_and_size()[0] == 0


@torch.no_grad()
def position_loss(model, source, length: int, micro_batch: int, batches: int, rt, sp=None,
                  document_masking: bool = True, windows=None) -> PositionLoss:
    """Summed next-token loss and token counts per position bucket over ``batches`` micro
    batches per DP rank of the (unshuffled) windows of ``length`` tokens of ``source``,
    added up over every rank. Averaged with the counts as weights it is the mean validation
    loss of those batches. ``windows``: the windows themselves (the training loop's
    validation set, blended or not) instead of ``source``."""
    data = windows if windows is not None else PackedSequences(source, length, 0, shuffle=False)
    loader = SequenceLoader(data, micro_batch, rt.dp, rt.dp_rank)
    edges = bucket_edges(length)
    inner = torch.tensor(edges[1:-1])
    sums = torch.zeros(len(edges) - 1, dtype=torch.float64)
    counts = torch.zeros(len(edges) - 1, dtype=torch.float64)
    index = _global_index(length, sp)
    t0 = time.perf_counter()
    for _ in range(batches):
        b = {k: v[:, index] for k, v in loader.next_micro_batch().items()}
        b = {k: v.to(rt.device) for k, v in b.items()}
        if document_masking:
            logits = model(b["tokens"], positions_BT=b["positions"], doc_ids_BT=b["doc_ids"])
            pos = b["positions"].cpu()
        else:
            pos = index.to(rt.device).expand_as(b["tokens"])
            logits = model(b["tokens"], positions_BT=pos)
            pos = pos.cpu()
        if logits is None:  # a pipeline stage before the last: the logits are elsewhere
            continue
        loss = vocab_parallel_cross_entropy(logits.float(), b["labels"]).double().cpu()
        if _tp_leader():
            bucket = torch.bucketize(pos.flatten(), inner, right=True)
            sums.index_add_(0, bucket, loss.flatten())
            counts.index_add_(0, bucket, torch.ones_like(loss.flatten()))
    runtime.all_reduce_sum(sums)
    runtime.all_reduce_sum(counts)
    elapsed = time.perf_counter() - t0
    tokens = batches * micro_batch * length * rt.dp
    return PositionLoss(length, edges, sums.tolist(), [int(c) for c in counts.tolist()],
                        tokens / max(elapsed, 1e-9))


@torch.no_grad()
def _answers_right(model, tokens_BT, mask_BT, rt, sp) -> torch.Tensor:
    """Per sequence: 1 if the argmax at every masked position is the next token (teacher
    forcing), summed over the ranks that hold those positions."""
    length = tokens_BT.shape[1]
    labels = torch.roll(tokens_BT, -1, 1)
    index = _global_index(length, sp)
    tokens, labels, mask = tokens_BT[:, index], labels[:, index], mask_BT[:, index]
    pos = index.expand_as(tokens)
    logits = model(tokens.to(rt.device), positions_BT=pos.to(rt.device))
    cols = mask.any(0).nonzero().flatten()
    wrong = torch.zeros(tokens.shape[0], dtype=torch.float64)
    if len(cols):
        full = gather_from_tensor_model_parallel_region(logits[:, cols.to(rt.device)].float())
        pred = full.argmax(-1).cpu()
        if _tp_leader():
            miss = (pred != labels[:, cols]) & (mask[:, cols] > 0)
            wrong += miss.sum(1).double()
    runtime.all_reduce_sum(wrong)
    return (wrong == 0).double()


def passkey_accuracy(model, tok, length: int, depth: float, samples: int, rt, sp=None,
                     seed: int = 0) -> float:
    b = passkey_batch(tok, length, depth, samples, seed)
    right = _answers_right(model, torch.from_numpy(b["tokens"]),
                           torch.from_numpy(b["answer_mask"]), rt, sp)
    return right.mean().item()


def mqar_probe(model, vocab: int, length: int, pairs: int, samples: int, rt, sp=None,
               seed: int = 0) -> float:
    """Fraction of MQAR queries answered (plait.data.mqar with the model's vocabulary)."""
    b = mqar_batch(samples, length, vocab, pairs, max(1, min(pairs, length // 8)), seed)
    return _query_accuracy(model, b, rt, sp)


@torch.no_grad()
def _query_accuracy(model, b: dict[str, torch.Tensor], rt, sp) -> float:
    """MQAR: argmax at each query position equals its value (summed over ranks)."""
    length = b["tokens"].shape[1]
    index = _global_index(length, sp)
    tokens, labels, mask = (b[k][:, index] for k in ("tokens", "labels", "loss_mask"))
    pos = index.expand_as(tokens)
    logits = model(tokens.to(rt.device), positions_BT=pos.to(rt.device))
    cols = (mask > 0).any(0).nonzero().flatten()
    stats = torch.zeros(2, dtype=torch.float64)
    if len(cols):
        full = gather_from_tensor_model_parallel_region(logits[:, cols.to(rt.device)].float())
        pred = full.argmax(-1).cpu()
        if _tp_leader():
            m = mask[:, cols] > 0
            stats[0] += (pred[m] == labels[:, cols][m]).sum().double()
            stats[1] += m.sum().double()
    runtime.all_reduce_sum(stats)
    return (stats[0] / stats[1].clamp_min(1)).item()


# ----------------------------------------------------------------------------- the program


@dataclass
class Results:
    checkpoint: str
    step: int
    train_length: int
    layout: dict
    positions: list[dict] = field(default_factory=list)
    passkey: dict = field(default_factory=dict)
    mqar: dict = field(default_factory=dict)
    seconds: float = 0.0


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a comma-separated list of numbers") from None


def _load_run(args) -> tuple[Config, Path, dict]:
    path = checkpoint.resolve(Path(args.checkpoint), args.tag, "--checkpoint")
    meta = checkpoint.read_meta(path)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        layers = [checkpoint.saved_config(meta)] + [parse_override(o) for o in args.overrides]
        merged: dict = {}
        for layer in layers:
            _merge(merged, layer)
        cfg = config_from_dict(merged, f"{path}/meta.json (with --set overrides)")
    return cfg, path, meta


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def _val_source(cfg: Config) -> tuple[Tokenizer, ShardedTokens]:
    """The validation split of the run's data (``data.datasets[0]``, else the run's own
    prepared ``<out_dir>/data``)."""
    given = bool(cfg.data.datasets)
    data_dir = Path(cfg.data.datasets[0]) if given else Path(cfg.out_dir) / "data"
    field = "data.datasets[0]" if given else "the run's data (out_dir/data)"
    try:
        tok = Tokenizer(tokenizer_in(data_dir))
    except TokenizerError as e:
        raise ConfigError(f"{field}: {e}; give the data to evaluate on with "
                          "--set data.datasets=[DIR]") from None
    return tok, ShardedTokens(data_dir, "val", tok.sha256)


def out_dir(args, path: Path, meta: dict) -> Path:
    """Where the results go: ``--out``, else ``<run>/eval/step<N>`` beside the checkpoints."""
    if args.out:
        return Path(args.out)
    return path.parent.parent / "eval" / f"step{int(meta.get('step', 0))}"


def evaluate_run(args) -> tuple[Results, bool, Path]:
    """Evaluate; returns the results, whether this is rank 0, and the output directory
    (checked writable before any work)."""
    cfg, path, meta = _load_run(args)
    check_run(cfg, runtime.read_launch_env().world_size)
    out = out_dir(args, path, meta)
    check_writable_dir(out, "--out")
    if args.tensorboard:
        check_writable_dir(Path(args.tensorboard), "--tensorboard")
    _floats(args.lengths, "--lengths")
    _floats(args.passkey_depths, "--passkey-depths")
    rt = runtime.initialize(
        cfg.parallel, cfg.training.seed, cpu_heap=cfg.training.cpu_heap
    )
    try:
        tok, val = _val_source(cfg)
        sp = sequence_parallel_context(cfg)
        model = build_model(cfg.model, rt.tp, vocab_size=tok.vocab_size, sp=sp).to(rt.device)
        checkpoint.init_weights_from(path, model)
        model.eval()
        L = cfg.data.seq_len
        res = Results(str(path), int(meta.get("step", 0)), L,
                      {"tp": rt.tp, "cp": rt.cp, "dp": rt.dp})
        t0 = time.perf_counter()
        lengths = [int(m * L) for m in _floats(args.lengths, "--lengths")]
        batches = args.batches or cfg.training.eval_batches
        for length in lengths:
            if (len(val) - 1) // length < 1:
                _say(rt, f"length {length}: the validation split has {len(val)} tokens, skipped")
                continue
            try:
                sp.local_index(length)
            except ValueError as e:
                _say(rt, f"length {length}: {e}; skipped")
                continue
            r = position_loss(model, val, length, cfg.training.micro_batch_size, batches, rt,
                              sp, cfg.data.document_masking)
            res.positions.append(asdict(r) | {"mean": r.mean})
            _say(rt, f"length {length}: loss {r.mean:.4f} (ppl {math.exp(min(r.mean, 50)):.1f}),"
                     f" {r.tokens_per_s:.0f} tokens/s")
        depths = _floats(args.passkey_depths, "--passkey-depths")
        if args.passkey_samples and depths:
            grid = {}
            for length in lengths:
                for d in depths:
                    try:
                        grid[f"{length}@{d}"] = passkey_accuracy(
                            model, tok, length, d, args.passkey_samples, rt, sp, args.seed
                        )
                    except ValueError as e:  # too short for the prompt, or an odd CP split
                        _say(rt, f"passkey {length}@{d}: {e}; skipped")
            res.passkey = {"lengths": lengths, "depths": depths, "accuracy": grid,
                           "samples": args.passkey_samples}
        if args.mqar_pairs:
            acc = mqar_probe(model, tok.vocab_size, L, args.mqar_pairs, 16, rt, sp, args.seed)
            res.mqar = {"pairs": args.mqar_pairs, "length": L, "accuracy": acc}
        res.seconds = time.perf_counter() - t0
        return res, rt.is_main, out
    finally:
        runtime.shutdown()


def _say(rt, text: str) -> None:
    if rt.is_main:
        print(text, flush=True)


def _loss(p: dict) -> PositionLoss:
    return PositionLoss(p["length"], p["edges"], p["loss_sum"], p["count"])


def table(res: Results) -> str:
    lines = []
    if res.positions:
        widest = max(res.positions, key=lambda p: p["length"])
        edges = widest["edges"]
        head = ["length", "mean"] + [f"[{a},{b})" for a, b in zip(edges[:-1], edges[1:])]
        lines.append(" | ".join(head))
        for p in res.positions:
            means = ["" if m is None else f"{m:.3f}" for m in _loss(p).bucket_means()]
            lines.append(" | ".join([str(p["length"]), f"{p['mean']:.3f}", *means]))
    if res.passkey:
        lines.append("passkey accuracy (rows: length, columns: depth)")
        lines.append(" | ".join(["length"] + [str(d) for d in res.passkey["depths"]]))
        for length in res.passkey["lengths"]:
            row = [res.passkey["accuracy"].get(f"{length}@{d}") for d in res.passkey["depths"]]
            lines.append(" | ".join([str(length)] + ["" if a is None else f"{a:.2f}" for a in row]))
    if res.mqar:
        lines.append(f"MQAR {res.mqar['pairs']} pairs at {res.mqar['length']} tokens: "
                     f"accuracy {res.mqar['accuracy']:.3f}")
    return "\n".join(lines)


def plots(res: Results, out: Path) -> list[Path]:
    """Loss by position (one line per evaluated length) and the passkey heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if res.positions:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in res.positions:
            xs = [max(a, 0.5) for a in p["edges"][:-1]]
            ax.plot(xs, _loss(p).bucket_means(), marker="o", label=f"{p['length']} tokens")
        ax.axvline(res.train_length, color="grey", ls="--", lw=0.8, label="training length")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="position (bucket start)", ylabel="loss", title="Loss by position")
        ax.legend()
        fig.tight_layout()
        made.append(out / "loss_by_position.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    if res.passkey and res.passkey["accuracy"]:
        lengths, depths = res.passkey["lengths"], res.passkey["depths"]
        grid = [[res.passkey["accuracy"].get(f"{n}@{d}", float("nan")) for d in depths]
                for n in lengths]
        fig, ax = plt.subplots(figsize=(6, 4))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(depths)), [str(d) for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set(xlabel="depth of the key", ylabel="length (tokens)", title="Passkey accuracy")
        fig.colorbar(im)
        fig.tight_layout()
        made.append(out / "passkey.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def to_tensorboard(res: Results, run_dir: Path, images: list[Path]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(Path(run_dir) / "tensorboard"))
    for p in res.positions:
        w.add_scalar(f"eval/loss_at_{p['length']}", p["mean"], res.step)
        for a, m in zip(p["edges"][:-1], _loss(p).bucket_means()):
            if m is not None:
                w.add_scalar(f"eval/loss_at_{p['length']}/pos_{a}", m, res.step)
    for key, acc in res.passkey.get("accuracy", {}).items():
        w.add_scalar(f"eval/passkey/{key}", acc, res.step)
    if res.mqar:
        w.add_scalar(f"eval/mqar_{res.mqar['pairs']}", res.mqar["accuracy"], res.step)
    for img in images:
        import numpy as np
        from PIL import Image

        w.add_image(f"eval/{img.stem}", np.asarray(Image.open(img).convert("RGB")), res.step,
                    dataformats="HWC")
    w.close()


def write_results(res: Results, out: Path, tensorboard: str) -> None:
    """eval.json and the PNGs into ``out`` (written beside it and renamed into place, so a
    failed evaluation leaves no half directory), then the TensorBoard scalars."""
    import shutil

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "eval.json").write_text(json.dumps(asdict(res), indent=1))
        plots(res, tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"--out: cannot write {out}: {e.strerror or e}") from None
    if tensorboard:
        to_tensorboard(res, Path(tensorboard), sorted(out.glob("*.png")))
