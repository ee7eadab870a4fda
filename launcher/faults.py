"""Fault injection for tests: every hook by which a test makes a real run fail on purpose,
in one place. Each is off unless its environment variable is set, and costs one lookup of
it where it is called. Nothing here is for users (docs/checkpoints.md says what the kill,
NaN and spike tests show).

``kill_point(point, step)``, ``PLAIT_TEST_KILL_IN_SAVE=<point>[:<rank>][@<step>]``
    SIGKILL at a point of a checkpoint save (launcher/checkpoint/saving.py): ``shards``
    (during the gathers, any rank), ``rng`` (after the rank's RNG file), ``meta`` (after
    meta.json), ``complete`` (after COMPLETE), ``rename`` (after the rename, before
    ``latest`` moves). Used by tests/launcher/test_checkpoint.py:
    test_kill_during_save_leaves_the_previous_checkpoint (one process, each point) and
    test_kill_9_of_either_rank_during_async_saves_of_a_torchrun_job (``;``-separated specs,
    one per restarted torchrun attempt).
``hold_save()``, ``PLAIT_TEST_HOLD_SAVE=<file>``
    Holds an asynchronous save's writer thread (launcher/checkpoint/saving.py) until the file
    exists. Used by tests/launcher/test_checkpoint.py:
    test_async_save_is_bit_exact_while_training_goes_on.
``nan_injected(step, rank)``, ``PLAIT_TEST_NAN_AT=<step>,...:<rank>``
    A NaN loss on that rank at those steps (launcher/loop.py). Used by
    tests/launcher/test_checkpoint.py: test_nonfinite_steps_are_skipped_on_every_rank, and
    test_loss_spike_is_skipped_on_every_rank as the run the spike's must equal.
``spike_injected(step, rank)``, ``PLAIT_TEST_SPIKE_AT=<step>,...:<rank>``
    A 10x loss on that rank at those steps (launcher/loop.py). Used by
    tests/launcher/test_checkpoint.py: test_loss_spike_is_skipped_on_every_rank.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from plait.parallel.runtime import global_rank


def kill_point(point: str, step: int) -> None:
    """Fault injection for the atomicity tests:
    ``PLAIT_TEST_KILL_IN_SAVE=<point>[:<rank>][@<step>]`` SIGKILLs this process (rank 0 by
    default) at that point of a save (of that step only, when given), as ``kill -9`` would.
    Specs separated by ``;`` apply to the successive attempts of a torchrun job that restarts
    its workers (``TORCHELASTIC_RESTART_COUNT`` picks one)."""
    specs = os.environ.get("PLAIT_TEST_KILL_IN_SAVE", "")
    if not specs:
        return
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    specs_by_attempt = specs.split(";")
    if attempt >= len(specs_by_attempt):
        return
    spec, _, at = specs_by_attempt[attempt].partition("@")
    name, _, rank = spec.partition(":")
    if name == point and int(rank or 0) == global_rank() and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


def hold_save() -> None:
    """Test hook for the overlap tests: ``PLAIT_TEST_HOLD_SAVE=<file>`` holds an asynchronous
    writer until that file exists, so a test can watch training go on while a save is in
    flight without relying on timing."""
    gate = os.environ.get("PLAIT_TEST_HOLD_SAVE", "")
    while gate and not Path(gate).exists():
        time.sleep(0.05)


def nan_injected(step: int, rank: int) -> bool:
    """Fault injection for the numerical-fault tests: ``PLAIT_TEST_NAN_AT=<step>,...:<rank>``
    makes that rank's loss (hence every gradient it contributes) NaN at those steps."""
    spec = os.environ.get("PLAIT_TEST_NAN_AT", "")
    if not spec:
        return False
    steps, _, who = spec.partition(":")
    return step in {int(x) for x in steps.split(",")} and rank == int(who or 0)


def spike_injected(step: int, rank: int) -> bool:
    """Fault injection for the spike tests: ``PLAIT_TEST_SPIKE_AT=<step>,...:<rank>`` makes
    that rank's loss (and so its gradients) 10x larger at those steps: finite, but a spike."""
    spec = os.environ.get("PLAIT_TEST_SPIKE_AT", "")
    if not spec:
        return False
    steps, _, who = spec.partition(":")
    return step in {int(x) for x in steps.split(",")} and rank == int(who or 0)
