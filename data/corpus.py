"""The bundled corpus and the error type for bad corpus input."""

from __future__ import annotations

from pathlib import Path

from plait.errors import UserError

BUNDLED_CORPUS = Path(__file__).parent / "corpus" / "devils_dictionary.jsonl"


class CorpusError(UserError, ValueError):
    """Bad corpus input; the message names the file (and line where there is one)."""


def resolve_corpus(path: str) -> str:
    """``data.corpus`` as a source string: the bundled corpus when empty."""
    if not path:
        return str(BUNDLED_CORPUS)
    if not path.startswith("hf:") and not Path(path).exists():
        raise CorpusError(f"data.corpus: {path} does not exist")
    return path
