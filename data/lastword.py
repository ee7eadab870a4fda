"""A local lm-eval task: last-word prediction on the held-out split of a prepared dataset.

    python -m plait.data.lastword --data runs/tiny/data --out runs/tiny/lm_eval [--docs 200]
    lm_eval --model hf --model_args pretrained=hf/tiny,trust_remote_code=True \\
        --tasks plait_lastword --include_path runs/tiny/lm_eval --device cpu

Each validation document (never trained on) becomes one example in the style of LAMBADA:
the context is its text up to its last word within the first ``max_words`` words, the target
that word with its leading space. lm-eval scores ``acc`` (the target is the greedy
continuation) and the target's perplexity. Writes ``lastword.jsonl`` and the task YAML
``plait_lastword.yaml`` (which names the JSON-lines file by absolute path); nothing comes
from the hub: HF datasets' own ``json`` loader reads the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from plait.errors import UserError, run_command

TASK = "plait_lastword"


def examples(data_dir: str | Path, docs: int, max_words: int = 64) -> list[dict[str, str]]:
    """Up to ``docs`` examples from the validation split of ``data_dir``, in order."""
    from .loader import ShardedTokens  # torch: imported only when there is work (--help)
    from .tokenizer import Tokenizer, tokenizer_in

    data_dir = Path(data_dir)
    tok = Tokenizer(tokenizer_in(data_dir))
    val = ShardedTokens(data_dir, "val", tok.sha256)
    starts = list(val.starts) + [len(val)]
    out = []
    for a, b in zip(starts[:-1], starts[1:]):
        ids = [int(t) for t in val.read(a, b) if t != tok.eos_id]
        words = tok.decode(ids).split()[:max_words]
        if len(words) < 8:
            continue
        out.append({"context": " ".join(words[:-1]), "target": " " + words[-1]})
        if len(out) == docs:
            break
    return out


def write_task(data_dir: str | Path, out: str | Path, docs: int = 200) -> Path:
    """Write the examples and the task YAML into ``out``; returns the YAML's path."""
    out = Path(out).resolve()
    rows = examples(data_dir, docs)
    if not rows:
        raise UserError(f"{data_dir}: the validation split has no document of 8 words or more")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror})") from None
    jsonl = out / "lastword.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = out / f"{TASK}.yaml"
    yaml.write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(jsonl))}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_target: "{{target}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "  - metric: perplexity\n"
        "    aggregation: perplexity\n"
        "    higher_is_better: false\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
    return yaml


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m plait.data.lastword", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared dataset directory")
    p.add_argument("--out", required=True, help="where the task files go (--include_path)")
    p.add_argument("--docs", type=int, default=200)
    args = p.parse_args(argv)

    def body() -> int:
        path = write_task(args.data, args.out, args.docs)
        print(f"wrote {path} ({TASK})")
        return 0

    return run_command(body, "lastword")


if __name__ == "__main__":
    sys.exit(main())
