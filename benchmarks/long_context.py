"""Long-context evaluation figures: passkey retrieval after a short curriculum, and length
extrapolation of the loss, for tiny hybrids against pure linear (and pure softmax) models.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/long_context.py   # "long-context" section
    .venv/bin/python benchmarks/long_context.py --smoke                   # seconds, prints only

1. Passkey: LALA (lightning + softmax) and LLLL (pure lightning), the tiny demo size
   (d=128, 4 heads, 4 layers), trained from scratch on passkey sequences
   (plait.data.passkey; the demo corpus's tokenizer) with a length curriculum (128 then 256
   tokens), loss on the key's digits only, AdamW; then scored with
   plait.launcher.evaluate's probe (every digit right, teacher forced) over lengths x depths.
2. Extrapolation: the demo model (configs/tiny.yaml as `make demo` trains it), and LLLL,
   LALA, AAAA trained with the same budget but without document masking (so positions run
   to the training length), evaluated with plait.launcher.evaluate's per-position loss at
   1x, 2x, 4x and 8x the training length (128 tokens).
Models train in parallel worker processes, one thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import machine, write_section  # noqa: E402

from plait.data.passkey import passkey_batch  # noqa: E402
from plait.data.tokenizer import Tokenizer  # noqa: E402
from plait.models.common import ModelConfig, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "long-context"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def tiny(pattern: str) -> ModelConfig:
    return ModelConfig(pattern=pattern, num_layers=4, hidden_size=128, num_heads=4,
                       ffn_hidden_size=384, tie_embeddings=True, lightning_block=64)


_RT = None


def _worker_init() -> None:
    global _RT
    from plait.parallel import runtime
    from plait.parallel.config import ParallelConfig

    _RT = runtime.initialize(ParallelConfig(), seed=0)


def train_passkey(pattern: str, tok_path: str, steps: tuple[int, int], batch: int):
    """Curriculum on passkey sequences; returns (pattern, grid, final loss, seconds)."""
    torch.set_num_threads(1)
    rt = _RT
    from plait.launcher.evaluation import passkey_accuracy

    tok = Tokenizer(tok_path)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(tiny(pattern), 1, vocab_size=tok.vocab_size)
    total = sum(steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=total,
                                                pct_start=max(0.05, 3 / total))
    step, loss = 0, float("nan")
    for length, n in zip((128, 256), steps):
        for _ in range(n):
            depth = float(torch.rand(1).item())
            b = passkey_batch(tok, length, depth, batch, seed=step)
            tokens = torch.from_numpy(b["tokens"])
            labels = torch.roll(tokens, -1, 1)
            out = model(tokens, labels, torch.from_numpy(b["answer_mask"]))
            out.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            loss, step = out.item(), step + 1
    model.eval()
    grid = {}
    for length in (128, 256, 512, 1024):
        for d in DEPTHS:
            grid[f"{length}@{d}"] = passkey_accuracy(model, tok, length, d, 32, rt, None, 10**6)
    return pattern, grid, loss, time.perf_counter() - t0


def run_cli(*args: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout


def extrapolation(name: str, sets: tuple[str, ...], masking_eval: bool, steps: int):
    out = WORK / name
    if not (out / "checkpoints" / "latest").is_file():
        run_cli("-m", "plait.launcher.train", "--config", "configs/tiny.yaml",
                "--set", f"out_dir={out}", "--set", "logging.progress_bar=false",
                "--set", f"training.steps={steps}", "--set", "training.eval_every=0",
                *[x for s in sets for x in ("--set", s)])
    args = ["-m", "plait.launcher.evaluate", "--checkpoint", str(out / "checkpoints"),
            "--batches", "8", "--passkey-samples", "0", "--out", str(out / "eval")]
    if not masking_eval:
        args += ["--set", "data.document_masking=false"]
    run_cli(*args)
    res = json.loads((out / "eval" / "eval.json").read_text())
    return name, {p["length"]: p["mean"] for p in res["positions"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    global WORK
    if args.smoke:  # never mixed with the real run's checkpoints
        WORK = WORK.with_name("long-context-smoke")
    WORK.mkdir(parents=True, exist_ok=True)
    steps = 200
    demo = ("demo (LALA, documents masked)", ())
    if args.smoke:
        steps = 5
    no_mask = ("data.document_masking=false",)
    runs = [demo] + [(f"{pat} (no masking)", (f"model.pattern={pat}", *no_mask))
                     for pat in ("LLLL", "LALA", "AAAA")]
    t0 = time.time()
    # the demo run first: its prepared data (tokenizer) is shared by everything after it
    first = extrapolation("demo", demo[1], True, steps)
    tok_path = str(WORK / "demo" / "data" / "tokenizer.model")
    ctx = mp.get_context("fork")
    curriculum = (10, 10) if args.smoke else (600, 300)
    batch = 4 if args.smoke else 16
    with ctx.Pool(2, initializer=_worker_init) as pool:
        passkey = pool.starmap(train_passkey, [(pat, tok_path, curriculum, batch)
                                               for pat in ("LALA", "LLLL")])
        tail = pool.starmap(extrapolation, [
            (name.split()[0], (*sets, f"data.datasets=[{WORK / 'demo' / 'data'}]"), False, steps)
            for name, sets in runs[1:]])
    first_no_mask = extrapolation("demo", (), False, steps)  # the demo model, masking off
    ext = [(runs[0][0], first[1]), ("demo, evaluated without masking", first_no_mask[1])]
    ext += [(runs[i + 1][0], r[1]) for i, r in enumerate(tail)]
    elapsed = time.time() - t0
    for name, grid, loss, sec in passkey:
        print(name, f"loss {loss:.3f}", f"{sec:.0f} s", json.dumps(grid))
    for name, by_len in ext:
        print(name, json.dumps(by_len))
    if args.smoke:
        return
    write_section("long-context", _doc(passkey, ext, curriculum, batch, steps, elapsed))
    _heatmap(passkey)


def _doc(passkey, ext, curriculum, batch, steps, elapsed) -> str:
    lengths = (128, 256, 512, 1024)
    lines = [
        "## Long-context evaluation: passkey and length extrapolation (CPU)",
        "",
        f"`OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/long_context.py` on {machine()}"
        f" ({elapsed / 60:.0f} min in all).",
        "",
        f"**Passkey.** The tiny demo size (d=128, 4 heads, 4 layers, vocab 2048) trained from "
        f"scratch on passkey sequences: {curriculum[0]} steps at 128 tokens then "
        f"{curriculum[1]} at 256 (the training length), {batch} sequences a step, loss on the "
        "key's digits only, AdamW 1e-3 one-cycle; scored on 32 fresh sequences per cell, "
        "right when every digit is (teacher forced). Accuracy by length (rows) and depth "
        "of the key (columns); plot: docs/passkey.png.",
        "",
        "| model | length | " + " | ".join(str(d) for d in DEPTHS) + " |",
        "|---|---|" + "---|" * len(DEPTHS),
    ]
    for name, grid, _, _ in passkey:
        for n in lengths:
            cells = " | ".join(f"{grid[f'{n}@{d}']:.2f}" for d in DEPTHS)
            lines.append(f"| {name} | {n} | {cells} |")
    final = ", ".join(f"{name} {loss:.3f} ({sec:.0f} s)" for name, _, loss, sec in passkey)
    lines += ["", f"Final training loss on the digits: {final}.", ""]
    lines += [
        f"**Length extrapolation.** configs/tiny.yaml's model and budget ({steps} steps of 8 x "
        "128 tokens on the demo corpus); validation loss (plait.launcher.evaluate, 8 batches "
        "per length) at 1x-8x the training length. Without document masking the context runs "
        "across documents and positions reach the evaluated length; with it (the demo's "
        "setting) positions restart at every document, so longer windows add documents, not "
        "context.",
        "",
        "| model | 128 (1x) | 256 (2x) | 512 (4x) | 1024 (8x) |",
        "|---|---|---|---|---|",
    ]
    for name, by_len in ext:
        cells = " | ".join(f"{by_len.get(str(n), by_len.get(n, float('nan'))):.3f}"
                           for n in lengths)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Reading: on this corpus (dictionary entries of a few dozen tokens) no model "
              "gains from context beyond the training length; the loss rises by about the same "
              "amount for the pure linear model as for the softmax ones, so the rise is the "
              "longer windows' content, not RoPE failing. The passkey grid is where positions "
              "show: LALA's softmax layers find a key placed near the question at 4x and 8x, "
              "and mostly not one placed further back than they were trained on."]
    return "\n".join(lines)


def _heatmap(passkey) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = (128, 256, 512, 1024)
    fig, axes = plt.subplots(1, len(passkey), figsize=(5 * len(passkey), 3.6))
    for ax, (name, grid, _, _) in zip(axes, passkey):
        data = [[grid[f"{n}@{d}"] for d in DEPTHS] for n in lengths]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(DEPTHS)), [str(d) for d in DEPTHS])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set(xlabel="depth of the key", ylabel="length (tokens)", title=f"{name}: passkey")
    fig.colorbar(im, ax=axes)
    fig.savefig(REPO / "docs" / "passkey.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
