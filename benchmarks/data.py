"""Data pipeline throughput, next to a plain HF datasets ``.map`` tokenization, in one run.

    python benchmarks/data.py            # writes the "data" section of docs/benchmarks.md

* preparation: tokens/s of ``plait.data.prepare`` with 1 and 2 workers (tokenizer given, so
  only reading, tokenizing and writing shards is timed) and of ``datasets.load_dataset(json)
  .map(encode, batched=True)`` on the same file;
* loading: sequences/s of the sharded loader (with document boundaries) at 8K and 128K tokens;
* the target: the loader delivers tokens at least 20x faster than the tiny model of
  configs/tiny.yaml trains on them (forward, backward and optimizer step, measured here).
The corpus is the bundled one repeated to a few MB.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, write_section  # noqa: E402

from plait.data.corpus import BUNDLED_CORPUS  # noqa: E402
from plait.data.loader import PackedSequences, SequenceLoader, ShardedTokens  # noqa: E402
from plait.data.prepare import PrepareConfig, prepare_corpus  # noqa: E402

REPEAT = 20


def _corpus(tmp: Path) -> Path:
    lines = BUNDLED_CORPUS.read_text().splitlines()
    path = tmp / "corpus.jsonl"
    with open(path, "w") as f:
        for r in range(REPEAT):
            for line in lines:
                doc = json.loads(line)
                f.write(json.dumps({"text": f"[{r}] " + doc["text"]}) + "\n")
    return path


def _prepare(src: Path, out: Path, tokenizer: Path, workers: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    cfg = PrepareConfig(source=str(src), out=str(out), tokenizer=str(tokenizer), workers=workers,
                        docs_per_shard=2000, val_fraction=0.0, show_progress=False)
    t0 = time.perf_counter()
    m = prepare_corpus(cfg)
    return time.perf_counter() - t0, m["counters"]["tokens"]["train"]


def _hf_map(src: Path, tokenizer: Path) -> tuple[float, int]:
    import datasets
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    cache = tempfile.mkdtemp()
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(src), split="train", cache_dir=cache)
    ds = ds.map(lambda b: {"ids": sp.encode(b["text"])}, batched=True, remove_columns=["text"])
    n = sum(len(x) for x in ds["ids"]) + len(ds)
    dt = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return dt, n


def _loader(prepared: Path, seq_len: int, n: int) -> float:
    data = PackedSequences(ShardedTokens(prepared, "train"), seq_len, seed=0)
    loader = SequenceLoader(data, 1, 1, 0)
    loader.next_micro_batch()
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_micro_batch()
    return n / (time.perf_counter() - t0)


def _tiny_model_tokens_per_s(vocab: int) -> float:
    import torch

    from plait.launcher.config import load_config
    from plait.models.common import build_model
    from plait.parallel import runtime
    from plait.parallel.config import ParallelConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    runtime.initialize(ParallelConfig(), seed=0)
    model = build_model(cfg.model, 1, vocab_size=vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, T = cfg.training.micro_batch_size, cfg.data.seq_len
    x = torch.randint(0, vocab, (B, T + 1))
    times = []
    for _ in range(12):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    runtime.shutdown()
    return B * T / min(times[2:])


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    try:
        src = _corpus(tmp)
        mb = src.stat().st_size / 1e6
        # the tokenizer comes from a one-off preparation; only the timed runs below count
        first = prepare_corpus(PrepareConfig(source=str(BUNDLED_CORPUS), out=str(tmp / "tok"),
                                             vocab_size=2048, show_progress=False))
        tok_path = tmp / "tok" / "tokenizer.model"
        rows = []
        for workers in (1, 2):
            dt, n = _prepare(src, tmp / f"w{workers}", tok_path, workers)
            rows.append((f"plait prepare, {workers} worker(s)", n / dt))
            print(rows[-1], flush=True)
        dt, n = _hf_map(src, tok_path)
        rows.append(("HF datasets load_dataset(json).map(encode, batched)", n / dt))
        print(rows[-1], flush=True)
        seq = {L: _loader(tmp / "w1", L, 200 if L == 8192 else 20) for L in (8192, 131072)}
        print(seq, flush=True)
        model_tps = _tiny_model_tokens_per_s(first["vocab_size"])
        ratio = seq[8192] * 8192 / model_tps
        print(
            f"tiny model trains {model_tps:.0f} tokens/s; loader/model = {ratio:.0f}x", flush=True
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "## Data pipeline, CPU",
        "",
        "Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/data.py`  ",
        f"Machine: {machine()}  ",
        f"Corpus: the bundled corpus repeated {REPEAT}x ({mb:.1f} MB of JSON lines), "
        "sentencepiece BPE vocab 2048.",
        "",
        "| preparation | tokens/s |",
        "|---|---|",
        *[f"| {name} | {tps:,.0f} |" for name, tps in rows],
        "",
        "| loader (sharded, with document boundaries) | sequences/s | tokens/s |",
        "|---|---|---|",
        *[f"| {L // 1024}K tokens | {s:,.1f} | {s * L:,.0f} |" for L, s in seq.items()],
        "",
        f"- the tiny model (configs/tiny.yaml) trains on {model_tps:,.0f} tokens/s; the loader "
        f"delivers 8K-token sequences at {seq[8192] * 8192:,.0f} tokens/s: **{ratio:,.0f}x** "
        f"(target >= 20x): {'met' if ratio >= 20 else 'NOT met'}",
    ]
    write_section("data", "\n".join(lines))


if __name__ == "__main__":
    main()
