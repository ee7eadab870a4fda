"""Launcher environments: torchrun / deepspeed launcher, Slurm srun, a plain process."""

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
    from plait.parallel.runtime import GLIBC_MALLOC_ENV, tune_cpu_allocator

    for k in GLIBC_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    applied = tune_cpu_allocator()
    if _glibc():
        assert applied
    assert tune_cpu_allocator() == applied  # idempotent


_ALLOCATOR_PROBE = r"""
import ctypes, json, sys
import torch
from plait.parallel.runtime import tune_cpu_allocator

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
    import json
    import os
    import subprocess
    import sys

    from plait.parallel.runtime import GLIBC_MALLOC_ENV

    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33: no mallinfo2")
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["release"] and got["keep"]
    assert got["release_80mb"] >= 80 << 20
    assert got["release_1mb"] == 0  # under the threshold: the heap either way
    assert got["keep_80mb"] == 0


def test_cpu_heap_setting_keeps_only_when_asked():
    from plait.launcher.config import TrainingConfig

    assert not TrainingConfig().keeps_cpu_heap  # opt-in: the heap's growth has no bound
    assert TrainingConfig(cpu_heap="keep").keeps_cpu_heap
    assert not TrainingConfig(cpu_heap="release").keeps_cpu_heap


def test_cpu_allocator_tuning_leaves_the_users_glibc_settings(monkeypatch):
    from plait.parallel.runtime import tune_cpu_allocator

    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert not tune_cpu_allocator()
