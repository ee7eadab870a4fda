"""Launcher environments: torchrun / deepspeed launcher, Slurm srun, a plain process."""

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


def test_cpu_allocator_tuning_applies_on_glibc():
    import platform

    from plait.parallel.runtime import tune_cpu_allocator

    applied = tune_cpu_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    assert tune_cpu_allocator() == applied  # idempotent
