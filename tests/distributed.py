"""The tests' N-forked-gloo-ranks harness: plait.parallel.local (shared with the benchmarks)."""

from plait.parallel.local import _free_port, run_distributed

__all__ = ["_free_port", "run_distributed"]
