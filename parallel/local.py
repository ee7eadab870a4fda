"""Run a function in N forked gloo ranks of this machine (the OLMo-core / torchtitan
pattern): the harness of the tests (tests/distributed.py) and of the benchmarks that compare
parallel layouts (benchmarks/sequence_parallel.py), kept in plait so that neither imports
the other's folder.

Forking after megatron-core is imported once (tests/conftest.py) costs about half a second a
call,
against ~8 s with spawn. Each worker sets one thread (a tiny step: ~10 ms instead of ~500 ms
with two ranks fighting over two cores), initialises plait's runtime with the requested
layout, runs ``fn(rt, *args)``, and sends back its return value or its traceback.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import random
import socket
import traceback

import torch


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768 up by default), in a block of
    its own per pytest-xdist worker. A port-0 pick is released before rank 0 binds it, and
    with two workers another process (or any outgoing connection, which takes ephemeral
    ports) could take it in between: seen once as EADDRINUSE in CI."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    k = int(worker[2:]) if worker[2:].isdigit() else 0
    lo = 20000 + 1000 * (k % 12)
    for port in random.sample(range(lo, lo + 1000), 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every port of the block busy: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_initialize(env, parallel):
    """torch.distributed + megatron groups only: no CPU adaptations, no seeding (canaries)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
    )
    ps.initialize_model_parallel(tensor_model_parallel_size=parallel.tensor_parallel)


def _worker(rank, world, port, parallel, seed, fn, args, queue, raw):
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        from plait.parallel import runtime

        env = runtime.LaunchEnv(rank, world, rank, "127.0.0.1", port, "test")
        if raw:
            _raw_initialize(env, parallel)
            rt = None
        else:
            rt = runtime.initialize(parallel, seed=seed, env=env)
        try:
            result = fn(rt, *args)
        finally:
            runtime.shutdown()
        # Serialise to bytes: torch's queue reducers would pass tensors as shared-memory file
        # descriptors, which die with this process.
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, "ok", buf.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(
    fn, world_size: int, *args, parallel=None, seed: int = 1234, timeout=300, raw=False
):
    """Run ``fn(rt, *args)`` on ``world_size`` forked ranks; return the results by rank.

    ``raw=True`` skips plait's runtime (no CPU adaptations; ``rt`` is None): for canaries."""
    from plait.parallel.config import ParallelConfig

    parallel = parallel or ParallelConfig()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(r, world_size, port, parallel, seed, fn, args, queue, raw)
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("distributed test failed on " + "\n".join(errors))
    return [results[r] for r in range(world_size)]
