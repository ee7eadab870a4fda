"""Training checkpoints to HuggingFace directories and back.

    python -m plait.launcher.export --checkpoint runs/tiny/checkpoints [--tag step200] \\
        --out hf/tiny [--dtype bf16] [--max-shard-size 2GB] [--tokenizer PATH] [--no-verify]
    python -m plait.launcher.export --from-hf hf/tiny --out runs/imported/checkpoints

An export is a directory that ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)``
load: config.json (the model config with every family option, ``auto_map``), the weights in
HF names as safetensors (sharded with an index above ``--max-shard-size``), the tokenizer as
tokenizer.json (the sentencepiece model converted exactly: normalisation, whitespace, byte
fallback; the .model file beside it), generation_config.json, the self-contained modeling
code of ``plait/launcher/hf_modeling`` (plain PyTorch, importing nothing from plait), and a
model card (README.md). Before it is renamed into place the export checks itself
(launcher/export_check.py): transformers, in a process that cannot import plait, must compute
plait's logits and greedy decode on the same weights (``--no-verify`` skips it); a failed
check, like any other error, leaves nothing under ``--out``.

Any checkpoint exports: every ZeRO stage and parallel layout (checkpoints hold full weights),
and a weights-only one written by ``--from-hf``.

The import writes a weights-only checkpoint (the same format, ``kind: weights``, no moments,
no counters, the export's tokenizer.model beside the weights) that a run starts from with
``checkpoint.init_from=DIR``: a new run (step 0, fresh optimizer and schedule) whose model
begins with those weights. The conversion itself is launcher/convert.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plait.errors import run_command

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m plait.launcher.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a checkpoint directory, or the run's checkpoint dir")
    p.add_argument("--tag", default="", help="which checkpoint (step<N>); default: the newest")
    p.add_argument("--from-hf", help="import: an exported HF directory")
    p.add_argument("--out", required=True, help="the HF directory (or checkpoint dir) to write")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--tokenizer", default="", help="the run's tokenizer.model, if it moved")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the self-check (transformers must compute plait's logits and "
                   "greedy decode before the export is renamed into place)")
    p.add_argument("--verify-tokens", type=int, default=0, metavar="N",
                   help="tokens whose logits the self-check compares (default 256)")
    args = p.parse_args(argv)
    if bool(args.checkpoint) == bool(args.from_hf):
        p.error("give exactly one of --checkpoint and --from-hf")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: _export(args), "export")


def _export(args: argparse.Namespace) -> int:
    from . import convert, export_check

    if args.from_hf:
        path = convert.import_hf(Path(args.from_hf), Path(args.out))
        print(f"imported {args.from_hf} -> {path} (train from it: "
              f"--set checkpoint.init_from={path})")
        return 0
    path = convert.export(Path(args.checkpoint), Path(args.out), args.tag, args.dtype,
                          args.max_shard_size, args.tokenizer, not args.no_progress,
                          not args.no_verify, args.verify_tokens or export_check.TOKENS)
    print(f"exported {path} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
