"""Reading raw corpora: local files and directories, or HF datasets.

Sources: a file, a directory (every supported file below it, sorted), or ``hf:NAME[:SPLIT]``
for a dataset from a hub (streamed; needs a reachable hub, never used by tests).
  * .jsonl / .json (one JSON object per line) and .txt (one document per file, or per line
    with ``text_lines``): decoded here, line by line, so that an undecodable byte or bad JSON
    is reported as file:line (or replaced and counted, with ``on_decode_error="replace"``);
  * .parquet and .arrow: read through HF ``datasets`` in streaming mode (their strings are
    already validated UTF-8), so a corpus larger than memory is never loaded whole.
Every record is yielded with its ordinal, which makes shard assignment deterministic and
preparation resumable.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .corpus import CorpusError

LOCAL_TEXT = (".jsonl", ".json", ".txt")
LOCAL_ARROW = (".parquet", ".arrow")


@dataclass
class IngestStats:
    records: int = 0
    empty_dropped: int = 0
    undecodable_replaced: int = 0
    files: list[str] = field(default_factory=list)


def list_files(source: str) -> list[Path]:
    p = Path(source)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_TEXT + LOCAL_ARROW
        )
    else:
        raise CorpusError(f"data source {source}: no such file or directory")
    bad = [f for f in files if f.suffix not in LOCAL_TEXT + LOCAL_ARROW]
    if bad:
        raise CorpusError(
            f"data source {bad[0]}: unsupported file type {bad[0].suffix!r}; "
            f"supported: {', '.join(LOCAL_TEXT + LOCAL_ARROW)}"
        )
    if not files:
        raise CorpusError(f"data source {source}: no supported files found")
    return files


def fingerprint(source: str) -> list:
    """What identifies a source for caching and resume: paths, sizes, modification times."""
    if source.startswith("hf:"):
        return [source]
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in list_files(source)]


def _decode(raw: bytes, path: Path, lineno: int, on_error: str, stats: IngestStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_error == "replace":
            stats.undecodable_replaced += 1
            return raw.decode("utf-8", errors="replace")
        raise CorpusError(
            f"{path}:{lineno}: undecodable UTF-8 at byte {e.start} of the line "
            "(pass on_decode_error=replace to replace such bytes and count them)"
        ) from None


def _local_text(path: Path, text_field: str, on_error: str, stats: IngestStats) -> Iterator[str]:
    if path.suffix == ".txt":
        yield _decode(path.read_bytes(), path, 1, on_error, stats)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = _decode(raw, path, lineno, on_error, stats)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(
                    f"{path}:{lineno}: no field {text_field!r} (data.prepare.text_field)"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield text


def _hf_records(builder_or_name: str, text_field: str, **kwargs) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(builder_or_name, streaming=True, **kwargs)
    for i, record in enumerate(ds):
        if text_field not in record:
            raise CorpusError(f"{builder_or_name} record {i}: no field {text_field!r}")
        yield record[text_field]


def iter_documents(
    source: str,
    text_field: str = "text",
    on_decode_error: str = "error",
    stats: IngestStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield (record ordinal, text) for every record, empty ones included (callers drop and
    count them, keeping the ordinals stable)."""
    if on_decode_error not in ("error", "replace"):
        raise ValueError(f"on_decode_error: {on_decode_error!r} is not 'error' or 'replace'")
    stats = stats if stats is not None else IngestStats()
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        texts = _hf_records(name, text_field, split=split or "train")
        stats.files.append(source)
    else:
        texts = _files(list_files(source), text_field, on_decode_error, stats)
    for i, text in enumerate(texts):
        stats.records += 1
        yield i, text


def _files(files, text_field, on_error, stats) -> Iterator[str]:
    for f in files:
        stats.files.append(str(f))
        if f.suffix in LOCAL_TEXT:
            yield from _local_text(f, text_field, on_error, stats)
        else:
            builder = "parquet" if f.suffix == ".parquet" else "arrow"
            yield from _hf_records(builder, text_field, data_files=[str(f)], split="train")
