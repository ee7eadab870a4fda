"""Print the layout a run would use, without training: ranks, pipeline stages, cost, memory.

    python -m plait.launcher.plan --config configs/train_1b.yaml \\
        --set parallel.pipeline_parallel=4 --set parallel.tensor_parallel=2 [--world 64]

For each pipeline stage: its layers and letters, its forward cost per token at the run's
sequence length (each letter's own estimate, ``Letter.cost``: a softmax layer at 32K does not
cost what a lightning layer does; plus the MLP, and the output layer on the last stage), its
parameters, and the memory per rank: weights, gradients and optimizer state under the chosen
ZeRO stage, and activations of the micro-batches in flight under 1F1B. Then the pipeline
bubble. Stages come from ``plait.parallel.stages.balance`` (the cut that minimises the
costliest stage). The memory figures are estimates, stated with their formulas below.

Memory model (bytes per rank; P = the stage's parameters / TP; ``--precision bf16``, the GPU
default, or fp32 as on CPU): weights 2 (bf16) or 4; gradients the same; optimizer 12 (fp32
master + two moments; 8 in fp32, where the weights are the master). ZeRO-1 divides the
optimizer by DP, ZeRO-2 the gradients too, ZeRO-3 the weights too. Activations per layer and
micro-batch: 34 s b h bytes in bf16 (Korthikanti et al. 2022, attention through flash/SDPA),
/ (TP x CP), x2 in fp32; the first stage holds min(p, m) micro-batches in flight.
"""

from __future__ import annotations

import argparse
import sys

from plait.errors import run_command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m plait.launcher.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--world", type=int, default=0, help="ranks (default: tp x pp x cp)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args(argv)
    return run_command(lambda: _plan(args), "plan")


def _plan(args: argparse.Namespace) -> int:
    from .config import load_config
    from .planning import plan, render

    cfg = load_config(args.config, args.overrides)
    p = cfg.parallel
    res = plan(cfg, args.world or p.tensor_parallel * p.pipeline_parallel * p.context_parallel,
               args.precision)
    print(render(cfg, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
