"""Checkpoint save and load: time and size for the tiny demo model and a ~125M preset, with
plait's logical format (launcher/checkpoint/) beside DeepSpeed's own ``save_checkpoint``
(what plait used before, and what a user of plain DeepSpeed gets), and plait's synchronous
save beside its asynchronous one (``checkpoint.async_save``).

    .venv/bin/python benchmarks/checkpoint.py              # writes the "checkpoint" section

One process, ZeRO-1, fp32, LAMB, after one optimizer step (so the moments exist); the
checkpoint goes to a temporary directory on the local disk. Both formats hold the same state
(weights and both moments in fp32); DeepSpeed's is written synchronously too (its
asynchronous writers need CUDA or an I/O extension this machine lacks). Best of 3.

Asynchronous: "blocked" is how long ``Saver.save`` holds the step loop (gathers, RNG file,
barrier, copies), "write" the time from the call until ``wait`` returns with nothing else
running; then once more with training steps run while the writer works, counting them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import machine, write_section  # noqa: E402

from plait.launcher import checkpoint  # noqa: E402
from plait.launcher.config import Config  # noqa: E402
from plait.launcher.engine import build_engine  # noqa: E402
from plait.models.common import build_model  # noqa: E402
from plait.models.presets import get_preset  # noqa: E402
from plait.parallel import runtime  # noqa: E402
from plait.parallel.config import ParallelConfig  # noqa: E402

VOCAB = 2048


class _Loader:
    def state_dict(self):
        return {"consumed_samples": 0}

    def load_state_dict(self, s):
        pass


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _step(engine, tok) -> None:
    engine.backward(engine(tok[:, :-1], tok[:, 1:]))
    engine.step()


def measure(preset: str, root: Path) -> dict[str, float]:
    cfg = Config()
    cfg.model = get_preset(preset)
    cfg.model.vocab_size = VOCAB
    cfg.training.precision, cfg.training.micro_batch_size = "fp32", 1
    cfg.data.seq_len = 64
    rt = runtime.initialize(ParallelConfig(zero_stage=1), 0)
    try:
        model = build_model(cfg.model, 1, vocab_size=VOCAB)
        engine, _, scheduler = build_engine(model, cfg, rt)
        tok = torch.randint(0, VOCAB, (1, 65))
        _step(engine, tok)
        identity = checkpoint.run_identity(cfg, "benchmark")
        loader = _Loader()
        out: dict[str, float] = {"params": sum(p.numel() for p in model.parameters())}
        times = {"plait_save": [], "plait_load": [], "ds_save": [], "ds_load": [],
                 "async_blocked": [], "async_write": []}
        for rep in range(3):
            d = root / f"{preset}-{rep}"
            saver = checkpoint.Saver(d / "async", cfg, rt, identity, asynchronous=True)
            t0 = time.perf_counter()
            saver.save(1, engine, scheduler, loader)
            times["async_blocked"].append(time.perf_counter() - t0)
            saver.wait()
            times["async_write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            path = checkpoint.save(d / "plait", 1, engine, scheduler, loader, cfg, rt, identity)
            times["plait_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpoint.load(path, engine, scheduler, loader, cfg, rt, identity)
            times["plait_load"].append(time.perf_counter() - t0)
            out["plait_bytes"] = _size(path)
            t0 = time.perf_counter()
            engine.save_checkpoint(str(d / "ds"), tag="step1")
            times["ds_save"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.load_checkpoint(str(d / "ds"), tag="step1")
            times["ds_load"].append(time.perf_counter() - t0)
            out["ds_bytes"] = _size(d / "ds" / "step1")
            shutil.rmtree(d)
        out.update({k: min(v) for k, v in times.items()})
        t0 = time.perf_counter()
        _step(engine, tok)
        out["step"] = time.perf_counter() - t0
        # Training goes on while the writer works (the writer shares the cores with it).
        saver = checkpoint.Saver(root / f"{preset}-overlap", cfg, rt, identity, asynchronous=True)
        t0 = time.perf_counter()
        saver.save(2, engine, scheduler, loader)
        steps = 0
        while saver.writing():
            _step(engine, tok)
            steps += 1
        saver.wait()
        out["overlap_steps"], out["overlap_total"] = steps, time.perf_counter() - t0
        shutil.rmtree(root / f"{preset}-overlap")
        return out
    finally:
        runtime.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["hybrid-tiny", "h3-125m"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    load = os.getloadavg()[0]  # a shared machine's other work shows in the overlap column
    rows, async_rows = [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for preset in args.presets:
            r = measure(preset, Path(tmp))
            print(preset, r, flush=True)
            rows.append(
                f"| {preset} | {r['params'] / 1e6:.1f}M | {r['plait_bytes'] / 2**20:.1f} | "
                f"{r['ds_bytes'] / 2**20:.1f} | {r['plait_save']:.2f} | {r['ds_save']:.2f} | "
                f"{r['plait_save'] / r['ds_save']:.2f}x | {r['plait_load']:.2f} | "
                f"{r['ds_load']:.2f} | {r['plait_load'] / r['ds_load']:.2f}x |"
            )
            async_rows.append(
                f"| {preset} | {r['plait_bytes'] / 2**20:.1f} | {r['plait_save']:.2f} | "
                f"{r['async_blocked']:.3f} | {r['async_write']:.2f} | "
                f"{r['async_blocked'] / r['plait_save']:.2f}x | {r['step']:.2f} | "
                f"{r['overlap_steps']} in {r['overlap_total']:.2f} |"
            )
    if args.no_write:
        return
    write_section(
        "checkpoint",
        "\n".join(
            [
                "## Checkpoint save and load (CPU)",
                "",
                "Command: `.venv/bin/python benchmarks/checkpoint.py`  ",
                f"Machine: {machine()}, load average {load:.1f} at the start  ",
                "One process, ZeRO-1, fp32 weights and LAMB moments after one step (vocab "
                f"{VOCAB}), local disk, best of 3. plait: launcher/checkpoint/ (gather, "
                "safetensors, fsync, sha256 of every file, rename); DeepSpeed: its own "
                "`save_checkpoint` / `load_checkpoint` (pickle, no fsync, no hashes), "
                "synchronous like plait's (no asynchronous writer runs on this machine).",
                "",
                "| preset | params | plait MiB | DeepSpeed MiB | plait save s | DeepSpeed "
                "save s | ratio | plait load s | DeepSpeed load s | ratio |",
                "|---|---|---|---|---|---|---|---|---|---|",
                *rows,
                "",
                "The save cost is dominated by writing the bytes and hashing them. plait "
                "writes 12 bytes per parameter (weight and two moments); DeepSpeed 16 (it "
                "also keeps the module's own copy of the weights). plait's load includes the "
                "run-identity check and the redistribution to the current layout; the "
                "integrity check (sha256 of every file) runs before it, once, on rank 0, "
                "when resume looks for the newest intact checkpoint, and is not timed here.",
                "",
                "### Synchronous and asynchronous save (`checkpoint.async_save`)",
                "",
                "Same process and state. Synchronous: the step loop waits for the whole save. "
                "Asynchronous: the loop is blocked only while `Saver.save` gathers, writes the "
                "RNG file and keeps CPU copies; rank 0's thread then writes, fsyncs, hashes, "
                "writes meta.json and COMPLETE and renames. Write: from the call until `wait` "
                "returns, nothing else running. Last column: training steps of the same "
                "model (batch 1 x 64 tokens) that ran while a second asynchronous save was "
                "being written, and that save's time from call to `wait` (the writer and "
                "training share the cores). Same files, so the same size.",
                "",
                "| preset | MiB | sync save s | async blocked s | async write s | blocked / "
                "sync | train step s | steps while writing, in s |",
                "|---|---|---|---|---|---|---|---|",
                *async_rows,
            ]
        ),
    )


if __name__ == "__main__":
    main()
