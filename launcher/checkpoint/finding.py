"""Finding checkpoints on disk: the newest complete one to resume (``find_resumable``,
which does not trust ``latest``), the one a command line or ``checkpoint.init_from`` names
(``resolve``, ``resolve_init``; verified), and deleting old ones (``prune``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .format import COMPLETE, META, REFUSED, CheckpointError, verify


def _step_of(tag: str) -> int | None:
    m = re.fullmatch(r"step(\d+)", tag)
    return int(m.group(1)) if m else None


def prune(ckpt_dir: Path, keep_last: int, keep_every: int, keep: str = "") -> list[str]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0: keep all), except every
    ``keep_every``-th step and ``keep``. A failed delete is printed, not raised."""
    if keep_last <= 0:
        return []
    tags = sorted(
        (t for t in (p.name for p in Path(ckpt_dir).iterdir()) if _step_of(t) is not None),
        key=_step_of,
    )
    doomed = []
    for t in tags[:-keep_last]:
        s = _step_of(t)
        if t == keep or (keep_every and s % keep_every == 0):
            continue
        try:
            shutil.rmtree(Path(ckpt_dir) / t)
            doomed.append(t)
        except OSError as e:
            print(f"checkpoint: could not delete {Path(ckpt_dir) / t}: {e}", flush=True)
    return doomed


def resolve(path: Path, tag: str = "", field: str = "--checkpoint") -> Path:
    """A checkpoint directory named on a command line: ``path`` itself if it is one, else
    ``path/tag``, else the newest complete one under ``path``; verified (see ``verify``).
    Anything unusable is a CheckpointError naming ``field``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{field} {path}: no such directory")
    if (path / META).is_file() or (path / COMPLETE).is_file():
        chosen = path
    elif tag:
        chosen = path / tag
        if not chosen.is_dir():
            have = sorted(p.name for p in path.glob("step*") if p.is_dir())
            raise CheckpointError(f"--tag {tag}: no {chosen}; checkpoints there: {have or 'none'}")
    else:
        found, problems = find_resumable(path)
        if found is None:
            why = "; ".join(problems) or "no checkpoint"
            raise CheckpointError(f"{field} {path}: no complete checkpoint ({why})")
        chosen = found
    why = verify(chosen)
    if why:
        raise CheckpointError(f"{field} {chosen}: not a usable checkpoint: {why}")
    return chosen


def find_resumable(ckpt_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint in ``ckpt_dir`` by step, and a line per unusable one
    found on the way (incomplete, corrupt, leftover temporaries). ``latest`` is not trusted
    for this: a process killed between the rename and the pointer's move leaves a newer
    complete checkpoint than ``latest`` names."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None, []
    problems = [f"{p}: an interrupted save (no completion), ignored" for p in
                sorted(ckpt_dir.glob(".tmp-step*"))]
    tags = sorted((p.name for p in ckpt_dir.iterdir() if _step_of(p.name) is not None),
                  key=_step_of, reverse=True)
    for t in tags:
        why = verify(ckpt_dir / t)
        if not why:
            return ckpt_dir / t, problems
        if why.startswith(REFUSED):
            # complete, but of a kind plait will not read: skipping it would start the run
            # over and, checkpoint by checkpoint, prune it
            raise CheckpointError(f"{ckpt_dir / t}: {why}; move it out of {ckpt_dir} to "
                                  "start over, or resume it with the plait that wrote it")
        problems.append(f"{ckpt_dir / t}: {why}; skipped")
    return None, problems


def resolve_init(path: Path) -> Path:
    """The checkpoint ``checkpoint.init_from`` names: ``path`` itself, or the newest complete
    one under it; verified (see ``verify``)."""
    path = Path(path)
    if path.is_dir() and not (path / META).is_file():
        found, problems = find_resumable(path)
        if found is None:
            why = "; ".join(problems) or "no checkpoint"
            raise CheckpointError(f"checkpoint.init_from: {path}: no complete checkpoint ({why})")
        path = found
    why = verify(path) if path.is_dir() else "not a directory"
    if why:
        raise CheckpointError(f"checkpoint.init_from: {path}: {why}")
    return path
