"""User mistakes, told in one line: the error type every plait command catches.

A user's mistake (a config field, a file that is missing or malformed, a checkpoint that
does not fit the run, an output that cannot be written, a second job on a run directory)
raises ``UserError``, or a subclass owned by the package that found it (``ConfigError``,
``CorpusError``, ``CheckpointError``...), with a message that names the field or the file.
Every command runs its body through ``run_command``: a ``UserError`` becomes one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.

Under torchrun or srun every rank raises the same error (the checks are deterministic, or
rank 0's verdict is broadcast), and only rank 0 prints it: one line for the whole job, not
one per rank.

errors/ stands on the ground of the house plan: it imports nothing of plait, so every
package may raise these.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

EXIT_USER = 2
"""The exit code of a user's mistake (a Slurm template reads it as "do not requeue")."""


class UserError(Exception):
    """A mistake the user can fix; the message names what is wrong and where (file:line,
    field, rank). Printed as one line, never with a traceback."""


def launch_rank() -> int:
    """This process's rank as its launcher told it (torchrun's RANK, srun's SLURM_PROCID),
    readable before any process group exists; 0 for a single process."""
    for name in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def one_line(text: str) -> str:
    """``text`` on a single line (a message quoting a multi-line value stays one line)."""
    return " ".join(str(text).split())


def run_command(body: Callable[[], int], prog: str) -> int:
    """Run a command's body; its return value is the exit code. A ``UserError`` is printed
    as ``<prog>: error: <message>`` by rank 0 only, and the code is ``EXIT_USER``."""
    try:
        return body()
    except UserError as e:
        if launch_rank() == 0:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER


__all__ = ["EXIT_USER", "UserError", "launch_rank", "one_line", "run_command"]
