"""Launcher environments (torchrun / deepspeed launcher, Slurm srun, a plain process) and
the CPU heap settings."""

import ctypes

import pytest

from plait.parallel.config import ParallelConfig, ParallelConfigError
from plait.parallel.runtime import _first_slurm_host, read_launch_env


def test_torchrun_env():
    env = read_launch_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "29400",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (
        3,
        8,
        1,
        "n1",
        29400,
    )
    assert env.launcher == "torchrun"


def test_slurm_env():
    env = read_launch_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_NTASKS": "16",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[007-010,012],login1",
        }
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 16, 1, "gpu007")
    assert env.master_port == 20000 + 4242
    assert env.launcher == "slurm"


def test_torchrun_vars_win_over_slurm():
    """torchrun inside an sbatch script: RANK is the truth, SLURM_PROCID is the node's task."""
    env = read_launch_env(
        {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    )
    assert env.rank == 1 and env.launcher == "torchrun"


def test_single_process():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize(
    "nodelist,first", [("node1", "node1"), ("a[1-3]", "a1"), ("gpu[09,11]", "gpu09"), ("x,y", "x")]
)
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_bad_env_is_named():
    with pytest.raises(ValueError, match="RANK='x'"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_world_size_must_fit_layout():
    with pytest.raises(ParallelConfigError, match="does not divide the world size 6"):
        ParallelConfig(tensor_parallel=4).data_parallel(6)
    assert ParallelConfig(tensor_parallel=2).data_parallel(8) == 4


def _glibc() -> bool:
    import platform

    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_cpu_allocator_tuning_applies_on_glibc(monkeypatch):
    from plait.parallel.cpu_heap import GLIBC_MALLOC_ENV, tune_cpu_allocator

    for k in GLIBC_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    applied = tune_cpu_allocator()
    if _glibc():
        assert applied
    assert tune_cpu_allocator() == applied  # idempotent


def _probe(source: str) -> dict:
    """Run ``source`` in a fresh interpreter without the user's glibc settings (the allocator
    settings are a process's: in a process that ran other tests, a block freed earlier can
    serve an allocation whatever the setting) and return the JSON of its last line."""
    import json
    import os
    import subprocess
    import sys

    from plait.parallel.cpu_heap import GLIBC_MALLOC_ENV

    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc < 2.33: no mallinfo2")
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-c", source], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


_ALLOCATOR_PROBE = r"""
import ctypes, json, sys
import torch
from plait.parallel.cpu_heap import tune_cpu_allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2

def mapped(nbytes):
    before = libc.mallinfo2().hblkhd
    x = torch.empty(nbytes, dtype=torch.uint8)
    x.fill_(1)
    during = libc.mallinfo2().hblkhd
    del x
    return during - before

out = {"release": tune_cpu_allocator(keep_large=False)}
out["release_80mb"], out["release_1mb"] = mapped(80 << 20), mapped(1 << 20)
out["keep"] = tune_cpu_allocator(keep_large=True)
out["keep_80mb"] = mapped(80 << 20)
print(json.dumps(out))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator")
def test_cpu_allocator_keep_and_release():
    """keep: above glibc's highest mmap threshold (32 MB) a tensor still comes from the heap,
    so a step's activations reuse freed memory instead of faulting in fresh pages; release:
    it gets its own mapping, returned when freed. Measured in a fresh interpreter: in a
    process that ran other tests, a large block freed earlier can serve the tensor from the
    heap whatever the setting (the test failed that way when it ran after others)."""
    got = _probe(_ALLOCATOR_PROBE)
    assert got["release"] and got["keep"]
    assert got["release_80mb"] >= 80 << 20
    assert got["release_1mb"] == 0  # under the threshold: the heap either way
    assert got["keep_80mb"] == 0


def test_cpu_heap_default_is_bounded():
    from plait.launcher.config import TrainingConfig

    assert TrainingConfig().cpu_heap == "bounded"  # keep's speed; its growth trimmed


_BOUND_PROBE = r"""
import ctypes, json
from plait.parallel.cpu_heap import HeapBound, tune_cpu_allocator

assert tune_cpu_allocator(keep_large=True)  # keep's settings: every block from the heap
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20

def block(mb):
    p = libc.malloc(mb * MB)
    ctypes.memset(p, 1, mb * MB)  # resident
    return p

bound = HeapBound(libc, fraction=0.1, slack=16 * MB, reserve=0.0)  # growth only
a = block(200)
pin = block(1)  # a live block above a: a's pages cannot go back as the heap's top
out = {"with_a": bound.check()}
libc.free(a)  # a hole the size of the peak: kept for reuse (the next step's pages)
out["hole_kept"] = bound.check()
r0 = bound.resident()
c = block(400)  # does not fit the hole: the heap grows past the live peak's 10%
out["grown"] = bound.check()
out["returned_mb"] = (r0 + 400 * MB - bound.resident()) / MB
out["trims"] = bound.trims
# the same growth again, now caught by the bound's own thread
libc.free(c)
x = block(500)
pin2 = block(250)  # larger than the first hole: placed above x
libc.free(x)
y = block(1000)  # past the 500 MB hole: 1.75 GB resident for 1.25 GB live
bound.start(interval=0.01)
import time
for _ in range(200):
    if bound.trims > 1:
        break
    time.sleep(0.01)
out["thread_trims"] = bound.trims - out["trims"]
bound.stop()
# memory outside the heap: a file's pages read through a mapping are not counted; anonymous
# pages malloc does not own are trimmed for once, then counted as outside the heap
import mmap, tempfile
n = bound.trims
with tempfile.TemporaryFile() as f:
    f.truncate(400 * MB)
    m = mmap.mmap(f.fileno(), 400 * MB)
    sum(m[i] for i in range(0, 400 * MB, 4096))  # resident, file-backed
    out["file_pages_trim"] = bound.check()
    m.close()
anon = mmap.mmap(-1, 400 * MB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, 400 * MB, 4096):
    anon[i] = 1
out["anon_first"], out["anon_again"] = bound.check(), bound.check()
print(json.dumps(out))
"""


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator")
def test_heap_bound_keeps_a_steady_heap_and_trims_growth():
    """Under keep's settings, a freed block's pages stay resident while they are within the
    live high-water mark (a steady step reuses them: no trim), and are returned once the
    heap grows past it by more than the fraction (a block that did not fit the hole). In a
    fresh interpreter: the settings are the process's."""
    got = _probe(_BOUND_PROBE)
    assert not got["with_a"] and not got["hole_kept"]
    assert got["grown"] and got["trims"] == 1
    assert got["returned_mb"] > 150, got  # the 200 MB hole's pages went back
    assert got["thread_trims"] >= 1, got
    assert not got["file_pages_trim"], got  # a mapped shard's pages are not the heap's
    assert got["anon_first"] and not got["anon_again"], got  # trimmed once, then counted out


@pytest.mark.skipif(not _glibc(), reason="glibc's allocator")
def test_heap_bound_trims_when_the_machine_runs_short():
    """Kept pages are a cache: under ``reserve`` of the memory available (the machine's or
    the job cgroup's), the heap is trimmed even within the growth bound."""
    from plait.parallel.cpu_heap import HeapBound

    bound = HeapBound.create()
    if bound is None:
        pytest.skip("glibc < 2.33: no mallinfo2")
    avail, total = bound.available()
    assert 0 < avail <= total
    bound.available = lambda: (50, 100)  # 50% available: keep
    assert not bound.check()
    bound.available = lambda: (5, 100)  # 5% < the 10% reserve: give back
    assert bound.check() and bound.trims == 1


def test_bounded_is_one_thread_per_process_and_stops_with_another_setting(monkeypatch):
    """``apply("bounded")`` starts the process's bound once, however many runs initialise
    (tests start several in one process); another setting stops it."""
    import threading

    from plait.parallel import cpu_heap

    for k in cpu_heap.GLIBC_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(cpu_heap, "_BOUND", None)

    def threads():
        return sum(t.name == "plait-heap-bound" and t.is_alive() for t in threading.enumerate())

    before = threads()
    try:
        a = cpu_heap.apply("bounded")
        if not _glibc() or a is None:
            pytest.skip("no glibc bound here")
        assert cpu_heap.apply("bounded") is a and threads() == before + 1
    finally:
        assert cpu_heap.apply("release") is None
    for _ in range(100):  # the thread ends at its next wake-up (50 ms)
        if threads() == before:
            break
        threading.Event().wait(0.02)
    assert threads() == before


def test_cpu_allocator_tuning_leaves_the_users_glibc_settings(monkeypatch):
    from plait.parallel.cpu_heap import tune_cpu_allocator

    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert not tune_cpu_allocator()
