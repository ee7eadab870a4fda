"""lm-eval-harness on the demo model: `make demo`'s run exported to HF and scored on the
local last-word task over its held-out split (plait.data.lastword). The point is that the
export evaluates with the standard tool; the score of a 1.2M-parameter model trained for 40
seconds is what it is.

    .venv/bin/python benchmarks/lm_eval_demo.py     # writes the "lm-eval" section

Trains configs/tiny.yaml into runs/lm-eval-demo (200 steps, as `make demo`) unless a
checkpoint is there, exports it, writes the task, runs ``lm_eval --model hf``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "runs" / "lm-eval-demo"


def sh(*cmd: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    py = sys.executable
    if not (RUN / "checkpoints" / "latest").is_file():
        sh(py, "-m", "plait.launcher.train", "--config", "configs/tiny.yaml",
           "--set", f"out_dir={RUN}", "--set", "logging.progress_bar=false")
    sh(py, "-m", "plait.launcher.export", "--checkpoint", str(RUN / "checkpoints"),
       "--out", str(RUN / "hf"), "--no-progress")
    sh(py, "-m", "plait.data.lastword", "--data", str(RUN / "data"), "--out", str(RUN / "task"))
    docs = len((RUN / "task" / "lastword.jsonl").read_text().splitlines())
    cmd = [str(Path(py).with_name("lm_eval")), "--model", "hf", "--model_args",
           f"pretrained={RUN / 'hf'},trust_remote_code=True,dtype=float32",
           "--tasks", "plait_lastword", "--include_path", str(RUN / "task"),
           "--device", "cpu", "--batch_size", "8", "--output_path", str(RUN / "eval")]
    sh(*cmd)
    newest = max((RUN / "eval").rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    r = json.loads(newest.read_text())["results"]["plait_lastword"]
    rows = [json.loads(x) for x in (RUN / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in rows if x["kind"] == "val"]
    shown = " ".join(cmd[1:]).replace(f"{REPO}/", "")
    acc = f"{r['acc,none']:.3f} ± {r['acc_stderr,none']:.3f}"
    body = f"""## lm-eval on the exported demo model (CPU)

`.venv/bin/python benchmarks/lm_eval_demo.py` on {machine()}: configs/tiny.yaml trained 200
steps (`make demo`; validation loss {val[-1]["loss"]:.3f}), exported with
`python -m plait.launcher.export`, and scored by lm-eval-harness 0.4.13
(`lm_eval {shown}`) on `plait_lastword`: the last word of each of the {docs} held-out documents
(words 1-64) given the words before it (`python -m plait.data.lastword`).

| task | documents | acc (target is the greedy continuation) | target perplexity |
|---|---|---|---|
| plait_lastword | {docs} | {acc} | {r["perplexity,none"]:.1f} |

A 1.2M-parameter model trained for 40 seconds on a 0.1M-token dictionary: the figure shows
that the export evaluates with the standard harness, not that the model knows words.
"""
    write_section("lm-eval", body)
    print(body)


if __name__ == "__main__":
    main()
