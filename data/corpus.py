"""Reading a JSON-lines corpus, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

BUNDLED_CORPUS = Path(__file__).parent / "corpus" / "devils_dictionary.jsonl"


class CorpusError(ValueError):
    """Bad corpus input; the message names file and line."""


def resolve_corpus(path: str) -> Path:
    p = Path(path) if path else BUNDLED_CORPUS
    if not p.is_file():
        raise CorpusError(f"data.corpus: {p} does not exist or is not a file")
    return p


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Yield non-empty documents. Empty ones are skipped (the caller counts them)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (data.text_field)")
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is not a string")
            yield text
