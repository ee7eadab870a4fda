"""Running plait's commands as a user does, fast: a forked child runs ``python -m <module>``'s
``__main__`` code (runpy) with its own stdout and stderr files, argv, working directory and
environment, and exits with the command's code. The child inherits the test process's
imports (megatron-core, torch: seconds per command otherwise), but it is a real process: an
uncaught exception prints its traceback to the child's stderr and exits 1, as the
interpreter would, and nothing it changes reaches the test process.
"""

from __future__ import annotations

import hashlib
import os
import runpy
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def run_module(module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 300) -> Ran:
    """``python -m module *args`` in a forked child (see the module docstring)."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="plait-cli-") as tmp:
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns to pytest
            code = 1
            try:
                out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(out, 1)
                os.dup2(err, 2)
                # pytest's capture replaced the stream objects: point them at the new fds
                sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                os.chdir(cwd)
                for k, v in (env or {}).items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
                sys.argv = [module, *args]
                try:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    if isinstance(e.code, str):
                        print(e.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()
                    code = 1
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise TimeoutError(f"{module} {args} ran past {timeout} s")
            time.sleep(0.02)
        code = os.waitstatus_to_exitcode(status)
        return Ran(code, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"))


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with its content hash (directories: "dir"):
    what "nothing under out_dir changed" compares. {} when root does not exist."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out
