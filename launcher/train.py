"""Entry point: ``python -m plait.launcher.train --config configs/tiny.yaml [--set a.b=c ...]``.

Works unchanged under torchrun, the deepspeed launcher and srun (plait.parallel.runtime
reads each one's environment), on CPU (gloo, fp32) and CUDA (nccl, bf16). The run itself is
launcher/trainer.py; this module is the command: arguments, the lines it prints, the exit
code. It imports the trainer only after parsing, so ``--help`` answers at once.

Exit codes (what a Slurm template acts on):
    0   trained to ``training.steps``, or had already (``finished: step N of N``); a stop
        signal at or after the last step changes nothing
    2   a user error: the config, the data, a checkpoint that does not fit this run, a run
        directory in use by another job (one line from rank 0; nothing was written)
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
import sys

from plait.errors import launch_rank, run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plait.launcher.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: _train(args), "train")


def _train(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config
    from .trainer import EXIT_NONFINITE, EXIT_REQUEUE, SKIPPED_STOPS, Trainer

    cfg = load_config(args.config, args.overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    outcome = Trainer(cfg).run()
    main_rank = launch_rank() == 0
    if outcome.finished:
        if main_rank:
            print(outcome.finished, flush=True)
        return 0
    history, why = outcome.history, outcome.stopped
    if why in SKIPPED_STOPS:
        spikes = " or a loss spike" if cfg.training.spike_zscore else ""
        if main_rank:
            ckpt = cfg.checkpoint.dir or f"{cfg.out_dir}/checkpoints"
            print(
                f"stopped: {cfg.training.max_skipped_in_a_row} steps in a row had a non-finite "
                f"gradient norm{spikes}; the last good weights are saved in {ckpt} (look at "
                "the data and the learning rate)",
                file=sys.stderr,
            )
        return EXIT_NONFINITE
    if why:
        if main_rank:
            print(f"stopped ({why}) at step {history[-1].step if history else '?'}: "
                  f"checkpoint saved, exit {EXIT_REQUEUE} to be requeued", flush=True)
        return EXIT_REQUEUE
    if history and main_rank:
        print(
            f"done: step {history[-1].step}, loss {history[0].loss:.4f} -> {history[-1].loss:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
