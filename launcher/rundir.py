"""One job per run directory: the lock a training run holds on its ``out_dir``.

Two jobs writing one run directory corrupt it quietly: both append to metrics.jsonl, one
deletes the other's ``.tmp-step*`` while it is being written, one resumes from the other's
checkpoint. A run therefore holds ``<out_dir>/.plait.lock`` from before its first write to
its exit; rank 0 holds it for the whole job (the other ranks learn the verdict).

The lock is a file created with O_EXCL (atomic on local file systems and NFS v3+) that names
its holder: host, pid, the process's start time (so a reused pid is not taken for the
holder), the Slurm job id, and when it started. A second job finds it and is refused at once
with one line naming that holder. A lock whose holder is gone is taken over, with a message:
- the holder ran on this host and its process no longer exists (pid and start time);
- the holder is this Slurm job before a requeue (same job id, a lower restart count);
- the holder was another Slurm job that ``squeue`` no longer lists as running.
Otherwise (a holder on another host without Slurm, or squeue unavailable) the lock stands and
the message says how to remove it by hand if that job is gone.

Taking over renames the stale file aside first and checks that what it renamed is the file it
judged stale, so two jobs taking over at the same moment cannot both win. Released (deleted)
when the run ends, only if it is still this process's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from plait.errors import UserError

LOCK_NAME = ".plait.lock"
LIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                     "RESIZING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "STOPPED",
                     "SIGNALING", "STAGE_OUT"}


class RunDirError(UserError):
    """The run directory is in use by another job, or cannot be written."""


def _start_time(pid: int) -> str:
    """The process's start time since boot in clock ticks (/proc/<pid>/stat field 22), ""
    where /proc does not say (then the pid alone identifies the holder)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return not start or _start_time(pid) in ("", start)


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: str
    slurm_job: str
    since: float
    slurm_restart: int = 0

    @staticmethod
    def me() -> Holder:
        pid = os.getpid()
        env = os.environ
        restart = env.get("SLURM_RESTART_COUNT", "0")
        return Holder(socket.gethostname(), pid, _start_time(pid), env.get("SLURM_JOB_ID", ""),
                      time.time(), int(restart) if restart.isdigit() else 0)

    def describe(self) -> str:
        job = f", Slurm job {self.slurm_job}" if self.slurm_job else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}{job}, since {when}"

    def same_process(self, other: Holder) -> bool:
        return (self.host, self.pid, self.start) == (other.host, other.pid, other.start)


def _read(path: Path) -> Holder | None:
    try:
        raw = json.loads(path.read_text())
        return Holder(str(raw["host"]), int(raw["pid"]), str(raw.get("start", "")),
                      str(raw.get("slurm_job", "")), float(raw.get("since", 0)),
                      int(raw.get("slurm_restart", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _slurm_job_gone(job: str) -> bool | None:
    """Whether Slurm no longer runs job ``job`` (None: cannot tell, no squeue)."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # "Invalid job id specified": long finished
        return "Invalid job id" in out.stderr or None
    states = set(out.stdout.split())
    return not states & LIVE_SLURM_STATES


def stale_reason(holder: Holder | None, me: Holder) -> str:
    """Why ``holder``'s lock may be taken over by ``me`` ("" when it stands)."""
    if holder is None:
        return "an unreadable lock file (a job killed while writing it)"
    requeued = me.slurm_restart > holder.slurm_restart
    if holder.slurm_job and holder.slurm_job == me.slurm_job and requeued:
        return f"this Slurm job {me.slurm_job} before its requeue"
    if holder.host == me.host:
        if not _alive(holder.pid, holder.start):
            return f"pid {holder.pid} is no longer running on this host"
        return ""
    if holder.slurm_job and _slurm_job_gone(holder.slurm_job):
        return f"Slurm job {holder.slurm_job} is no longer running"
    return ""


class RunLock:
    """``<out_dir>/.plait.lock`` (see the module docstring). ``acquire`` creates ``out_dir``
    if needed and returns a message when it took a stale lock over ("" otherwise);
    ``release`` deletes the lock, and ``out_dir`` too when this lock created it and nothing
    else was written there."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.me = Holder.me()
        self.held = False
        self.created_dir = False

    def acquire(self) -> str:
        self._make_dir()
        note = ""
        for _ in range(5):
            if self._create():
                self.held = True
                return note
            holder = _read(self.path)
            if holder is not None and holder.same_process(self.me):
                self.held = True
                return note
            why = stale_reason(holder, self.me)
            if not why:
                raise RunDirError(
                    f"out_dir: {self.out_dir} is in use by another run "
                    f"({holder.describe()}; lock {self.path}); wait for it to end or choose "
                    f"another out_dir (if that job is gone, delete the lock file)"
                )
            if self._take_over(holder):
                who = holder.describe() if holder else "an unknown holder"
                note = f"took over the lock of {self.out_dir} from {who}: {why}"
        raise RunDirError(f"out_dir: {self.out_dir}: could not take the lock {self.path}")

    def _make_dir(self) -> None:
        d = self.out_dir
        if d.exists() and not d.is_dir():
            raise RunDirError(f"out_dir: {d} exists and is not a directory")
        try:
            if not d.exists():
                d.mkdir(parents=True)
                self.created_dir = True
        except OSError as e:
            raise RunDirError(f"out_dir: cannot create {d}: {e.strerror}") from None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise RunDirError(f"out_dir: cannot write in {self.out_dir}: {e.strerror}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self.me)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, holder: Holder | None) -> bool:
        """Move the stale lock aside; False when what was moved is not the stale holder's
        (another job took it over first: it is put back and the caller looks again)."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me.pid}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # released meanwhile: try to create it
        moved = _read(aside)
        if holder is None or (moved is not None and moved.same_process(holder)):
            aside.unlink(missing_ok=True)
            return True
        try:  # someone else's fresh lock: put it back unless a third job created one
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = _read(self.path)
        if holder is not None and holder.same_process(self.me):
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.out_dir.rmdir()  # only when empty: nothing else was written
            except OSError:
                pass


def check_writable_dir(path: Path, field: str) -> None:
    """Refuse an output directory that is a file or cannot be created or written, before
    any work: one line naming ``field``. Creates nothing."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if probe == path and not path.is_dir():
        raise RunDirError(f"{field}: {path} exists and is not a directory")
    if probe != path and not probe.is_dir():
        raise RunDirError(f"{field}: {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunDirError(f"{field}: {probe} is not writable")
    if _read_only(probe):
        raise RunDirError(f"{field}: {probe} is on a read-only file system")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
