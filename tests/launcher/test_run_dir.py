"""One job per run directory, and a finished run stays finished.

- The lock (launcher/rundir.py): a second holder is refused with the first one named; a lock
  whose process is gone, or whose Slurm job was requeued or has ended, is taken over; a lock
  on another host that nothing proves stale stands; release deletes only one's own lock.
- Two jobs on one out_dir, as users start them: while a single-process run trains (held
  still with SIGSTOP, so the test does not race it), a second single process and a torchrun
  job of two ranks are refused at once with one line naming the holder (rank 0 prints it,
  rank 1 is silent, both exit 2); the first then finishes with one metrics row per step.
  Running its command again says it is finished and changes nothing. A run killed with
  SIGKILL leaves its lock; the next run takes it over, says so, and resumes.
- A stop signal after the last step (Slurm's warning near the end of a job) leaves the
  finished run's exit code 0.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.launcher.rundir import LOCK_NAME, Holder, RunDirError, RunLock, stale_reason
from tests.cli import run_module, snapshot
from tests.distributed import _free_port
from tests.helpers import train_rows

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")


def _write_lock(out: Path, **fields) -> None:
    out.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "start": "", "slurm_job": "",
              "since": time.time(), "slurm_restart": 0, **fields}
    (out / LOCK_NAME).write_text(json.dumps(holder))


def test_lock_refuses_a_second_holder_and_releases_its_own(tmp_path):
    out = tmp_path / "run"
    a = RunLock(out)
    assert a.acquire() == "" and a.created_dir
    b = RunLock(out)
    b.me = Holder("otherhost", 4242, "", "", time.time())  # another process
    with pytest.raises(RunDirError, match=rf"in use by another run \(pid {os.getpid()} on "):
        b.acquire()
    b.release()  # not held: leaves a's lock alone
    assert (out / LOCK_NAME).is_file()
    a.release()
    assert not out.exists()  # created by the lock, nothing else written: removed again


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path / "a", pid=dead.pid)
    note = RunLock(tmp_path / "a").acquire()
    assert f"pid {dead.pid} is no longer running on this host" in note
    # the same Slurm job after a requeue (a higher restart count) takes over its own lock
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(tmp_path / "b", host="elsewhere", pid=1, slurm_job="77", slurm_restart=0)
    assert "before its requeue" in RunLock(tmp_path / "b").acquire()
    # another host, a Slurm job that squeue no longer knows: gone
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\necho 'slurm_load_jobs error: Invalid job id "
                                 "specified' >&2\nexit 1\n")
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    _write_lock(tmp_path / "c", host="elsewhere", pid=1, slurm_job="55")
    assert "Slurm job 55 is no longer running" in RunLock(tmp_path / "c").acquire()
    # another host without Slurm: nothing proves it gone, so it stands
    me = Holder.me()
    other = Holder("elsewhere", 1, "", "", time.time())
    assert stale_reason(other, me) == ""
    _write_lock(tmp_path / "d", host="elsewhere", pid=1)
    with pytest.raises(RunDirError, match="if that job is gone, delete the lock file"):
        RunLock(tmp_path / "d").acquire()


def _train_cmd(out: Path, steps: int, *sets: str) -> list[str]:
    args = ["--config", TINY, "--set", f"out_dir={out}", "--set", "logging.progress_bar=false",
            "--set", f"training.steps={steps}", "--set", "training.eval_every=0",
            "--set", "data.seq_len=64", "--set", "training.micro_batch_size=2"]
    for s in sets:
        args += ["--set", s]
    return args




def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "plait.launcher.train", *args], cwd=REPO,
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def _wait_for(what, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not what():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_two_jobs_on_one_run_directory(tmp_path):
    out, steps = tmp_path / "run", 30
    first = _start(_train_cmd(out, steps), tmp_path / "first.log")
    try:
        _wait_for(lambda: len(train_rows(out)) >= 2, first, tmp_path / "first.log")
        first.send_signal(signal.SIGSTOP)  # holds the lock, trains nothing while we look
        t0 = time.time()
        second = run_module("plait.launcher.train", _train_cmd(out, steps, "training.seed=7"),
                            cwd=REPO)
        assert time.time() - t0 < 15
        assert second.code == 2 and "Traceback" not in second.text, second.text[-3000:]
        (line,) = [x for x in second.err.splitlines() if x.strip()]
        assert f"in use by another run (pid {first.pid} on {socket.gethostname()}" in line
        # a torchrun job: rank 0 says it once, rank 1 is silent, both exit 2
        logs = tmp_path / "torchrun-logs"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "--redirects=3", f"--log-dir={logs}", "-m",
               "plait.launcher.train", *_train_cmd(out, steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0  # torchrun's own code for a failed worker is 1
        err = {r: next(logs.rglob(f"attempt_0/{r}/stderr.log")).read_text() for r in (0, 1)}
        assert err[1].strip() == "", err[1]
        (line,) = [x for x in err[0].splitlines() if x.strip()]
        assert line.startswith("train: error: out_dir: ") and "in use by another run" in line
        assert "exitcode  : 2" in proc.stderr and "exitcode  : 1" not in proc.stderr
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert [r["step"] for r in train_rows(out)] == list(range(1, steps + 1))  # one row per step
    assert not (out / LOCK_NAME).exists()

    # the same command again: finished, nothing written
    before = snapshot(out)
    again = run_module("plait.launcher.train", _train_cmd(out, steps), cwd=REPO)
    assert again.code == 0, again.text[-3000:]
    assert f"finished: step {steps} of {steps}" in again.out
    assert snapshot(out) == before

    # a run killed with SIGKILL leaves its lock; the next one takes it over and resumes
    more = _train_cmd(out, 2 * steps, "checkpoint.save_every=5")
    killed = _start(more, tmp_path / "killed.log")
    _wait_for(lambda: len(train_rows(out)) >= steps + 6, killed, tmp_path / "killed.log")
    killed.kill()
    killed.wait()
    assert (out / LOCK_NAME).exists()
    after = run_module("plait.launcher.train", more, cwd=REPO)
    assert after.code == 0, after.text[-3000:]
    assert f"took over the lock of {out} from pid {killed.pid}" in after.out
    assert "resumed from" in after.out and f"done: step {2 * steps}" in after.out


def test_a_stop_signal_after_the_last_step_leaves_exit_0(tmp_path):
    """SIGUSR1 right after ``done:`` (the trainer tearing down; before the fix its handler
    was already restored to the default, and the signal killed the finished process)."""
    out, log = tmp_path / "run", tmp_path / "log"
    proc = _start(_train_cmd(out, 3), log)
    deadline = time.time() + 300
    while "done: step 3" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert alive, "the process had exited before the signal: nothing was tested"
    assert not (out / "stop.json").exists()
