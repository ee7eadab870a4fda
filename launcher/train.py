"""Entry point: ``python -m plait.launcher.train --config configs/tiny.yaml [--set a.b=c ...]``.

Works unchanged under torchrun, the deepspeed launcher and srun (plait.parallel.runtime
reads each one's environment), on CPU (gloo, fp32) and CUDA (nccl, bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from plait.data.corpus import resolve_corpus
from plait.data.loader import BlendedSequences, PackedSequences, SequenceLoader, ShardedTokens
from plait.data.prepare import PrepareConfig, prepare_corpus
from plait.data.tokenizer import Tokenizer
from plait.models.common import build_model, letter
from plait.parallel import runtime
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import logical_numel

from .config import Config, ConfigError, load_config
from .engine import build_engine
from .loop import StepStats, run


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


def train(cfg: Config) -> list[StepStats]:
    rt = runtime.initialize(cfg.parallel, cfg.training.seed)
    try:
        tok, train_set, val_set = build_data(cfg, rt)
        sp = sequence_parallel_context(cfg)
        model = build_model(cfg.model, rt.tp, vocab_size=tok.vocab_size, sp=sp)
        engine, _, scheduler = build_engine(model, cfg, rt)
        loader = SequenceLoader(train_set, cfg.training.micro_batch_size, rt.dp, rt.dp_rank)

        ckpt_dir = _checkpoint_dir(cfg)
        if cfg.checkpoint.resume and (ckpt_dir / "latest").is_file():
            path, client = engine.load_checkpoint(str(ckpt_dir))
            if path is None:
                raise RuntimeError(
                    f"checkpoint.dir: could not load the latest checkpoint in {ckpt_dir}"
                )
            loader.load_state_dict(client["loader"])
            if rt.is_main:
                print(f"resumed from {path} at step {engine.global_steps}", flush=True)

        if rt.is_main:
            n_params = logical_numel(model)
            print(
                f"plait: {cfg.model.pattern} ({cfg.model.num_layers} layers, "
                f"d={cfg.model.hidden_size}), "
                f"~{n_params / 1e6:.2f}M params, vocab {tok.vocab_size}, "
                f"{len(train_set)} train sequences of {cfg.data.seq_len} tokens; "
                f"world {rt.world_size} (tp {rt.tp} cp {rt.cp} dp {rt.dp}), {rt.device}, "
                f"optimizer {cfg.optimizer.name}, ZeRO-{cfg.parallel.zero_stage}",
                flush=True,
            )
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

        def save(step: int) -> None:
            every = cfg.checkpoint.save_every
            if (every and step % every == 0) or step == cfg.training.steps:
                engine.save_checkpoint(
                    str(ckpt_dir),
                    tag=f"step{step}",
                    client_state={"loader": loader.state_dict()},
                )

        return run(engine, scheduler, cfg, rt, loader, val_set, on_step=save, sp=sp)
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        history = train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if history and os.environ.get("RANK", "0") == "0":
        print(
            f"done: step {history[-1].step}, loss {history[0].loss:.4f} -> {history[-1].loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
