"""Entry point: ``python -m plait.launcher.train --config configs/tiny.yaml [--set a.b=c ...]``.

Works unchanged under torchrun, the deepspeed launcher and srun (plait.parallel.runtime
reads each one's environment), on CPU (gloo, fp32) and CUDA (nccl, bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from plait.data.loader import PackedSequences, SequenceLoader
from plait.data.prepare import prepare
from plait.models.common import build_model
from plait.parallel import runtime
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


def train(cfg: Config) -> list[StepStats]:
    rt = runtime.initialize(cfg.parallel, cfg.training.seed)
    try:
        work = Path(cfg.out_dir) / "data"
        if rt.is_main:
            prepare(cfg.data, work)
        runtime.barrier()
        data = prepare(cfg.data, work, show_progress=False)  # a cache hit on every rank
        model = build_model(cfg.model, rt.tp, vocab_size=data.tokenizer.vocab_size)
        engine, _, scheduler = build_engine(model, cfg, rt)
        train_set = PackedSequences(data.load("train"), cfg.data.seq_len, cfg.data.seed)
        val_tokens = data.load("val")
        val_set = (
            PackedSequences(val_tokens, cfg.data.seq_len, cfg.data.seed, shuffle=False)
            if len(val_tokens) > cfg.data.seq_len
            else None
        )
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
                f"~{n_params / 1e6:.2f}M params, vocab {data.tokenizer.vocab_size}, "
                f"{len(train_set)} train sequences of {cfg.data.seq_len} tokens; "
                f"world {rt.world_size} (tp {rt.tp} dp {rt.dp}), {rt.device}, "
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

        return run(engine, scheduler, cfg, rt, loader, val_set, on_step=save)
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
    history = train(cfg)
    if history and os.environ.get("RANK", "0") == "0":
        print(
            f"done: step {history[-1].step}, loss {history[0].loss:.4f} -> {history[-1].loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
