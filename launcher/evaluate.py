"""Long-context evaluation of a trained checkpoint: is the context used?

    python -m plait.launcher.evaluate --checkpoint runs/tiny/checkpoints [--tag step200] \\
        [--config configs/tiny.yaml] [--set parallel.tensor_parallel=2 ...] \\
        [--lengths 1,2,4,8] [--batches 8] [--passkey-depths 0,0.25,0.5,0.75,1] \\
        [--passkey-samples 8] [--mqar-pairs 8] [--out DIR] [--tensorboard RUN_DIR]

Runs under torchrun/srun like training, in the layout the config says (TP, CP, DP), on the
validation split of the run's data (or ``data.datasets`` given with --set) and reports:
- loss and perplexity by position bucket (positions [0, 1), [1, 2), [2, 4), ... up to the
  evaluated length) at 1x, 2x, 4x, 8x the training length: length extrapolation (linear
  layers need no positional limit; softmax layers with RoPE may degrade beyond it). The
  position is the one the model sees: within the document with ``data.document_masking``
  (the default), in the window without;
- passkey retrieval (plait.data.passkey) over the lengths x depths grid, as accuracy (every
  digit of the key predicted), and MQAR (plait.data.mqar) at a number of pairs;
- the evaluation's own throughput.
Results: ``<out>/eval.json``, a table on stdout, PNGs (loss by position per length; a length x
depth passkey heatmap), and TensorBoard scalars and images in ``--tensorboard`` (the run
directory: beside the training curves). The model's weights come from the checkpoint
(any layout, as for resuming; also a weights-only import); the optimizer state is not read.
The output directory is checked before any work and written whole or not at all. The
measures themselves are launcher/evaluation.py.
"""

from __future__ import annotations

import argparse
import sys

from plait.errors import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plait.launcher.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tag", default="")
    p.add_argument("--config", default="", help="a run config (default: the checkpoint's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--lengths", default="1,2,4,8", help="multiples of the training length")
    p.add_argument("--batches", type=int, default=0, help="micro batches per DP rank and length")
    p.add_argument("--passkey-depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--passkey-samples", type=int, default=8)
    p.add_argument("--mqar-pairs", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="results directory (default: <run>/eval/step<N>)")
    p.add_argument("--tensorboard", default="", help="a run directory to log into")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: _evaluate(args), "evaluate")


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_run, table, write_results

    res, main_rank, out = evaluate_run(args)
    if not main_rank:
        return 0
    write_results(res, out, args.tensorboard)
    print(table(res))
    print(f"results: {out / 'eval.json'} ({res.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
