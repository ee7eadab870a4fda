"""Pipeline stage planning, pure arithmetic: how a stack of layers is cut into stages
(``balance``, ``stage_layers``), which model chunks a pipeline rank holds (``Stage``,
``local_stages``), and the idle fraction of the schedule (``bubble_fraction``). This is the
stage balancer that ``python -m plait.launcher.plan`` prints and training uses. Costs come
from the caller (the families' cost estimates at the run's sequence length; a softmax layer
at 32K does not cost what a lightning layer does), so this module knows nothing of the
models; nor of torch or process groups: parallel/pipeline.py runs the stages it plans.
"""

from __future__ import annotations

from dataclasses import dataclass


def balance(costs: list[float], stages: int, last_extra: float = 0.0,
            first_extra: float = 0.0) -> list[tuple[int, int]]:
    """Cut ``costs`` (one per layer, in order) into ``stages`` contiguous non-empty runs
    [start, end) minimising the costliest stage, where the first stage also carries
    ``first_extra`` (the embedding) and the last ``last_extra`` (the output layer and loss).
    Exact (dynamic programming over cut points, O(stages x layers^2)); ties go to the
    earliest cut."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"pipeline: {stages} stages for {n} layers (need 1 <= stages <= layers)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, first: bool, last: bool) -> float:
        return prefix[b] - prefix[a] + (first_extra if first else 0) + (last_extra if last else 0)

    inf = float("inf")
    # best[k][j]: the smallest maximum over the first j layers cut into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                worst = max(best[k - 1][i], cost(i, j, k == 1, k == stages and j == n))
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    bounds, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def stage_layers(costs: list[float], pipeline: int, virtual: int = 1,
                 marks: list[int] | None = None, last_extra: float = 0.0,
                 first_extra: float = 0.0) -> list[tuple[int, int]]:
    """The layers [start, end) of every model chunk, in model order: ``pipeline x virtual``
    chunks, chunk c of pipeline rank r being number ``c * pipeline + r`` (megatron's
    interleaved assignment). ``marks``: the cut points a user gave (layer indices where a new
    chunk starts, from ``|`` in the pattern); else the balancer cuts."""
    chunks = pipeline * virtual
    if marks is not None:
        cuts = sorted(set(marks))
        if len(cuts) != chunks - 1 or not all(0 < c < len(costs) for c in cuts):
            raise ValueError(
                f"model.pattern: {len(cuts) + 1} stages marked with '|' but pipeline_parallel "
                f"x virtual_pipeline = {chunks}"
            )
        return list(zip((0, *cuts), (*cuts, len(costs))))
    return balance(costs, chunks, last_extra=last_extra, first_extra=first_extra)


def bubble_fraction(stages: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle fraction of a step under 1F1B, (p - 1) / (m + p - 1); interleaved with v model
    chunks per rank, (p - 1) / (v m + p - 1) (Narayanan et al., 2021)."""
    p, m, v = stages, micro_batches, virtual
    return (p - 1) / (v * m + p - 1)


@dataclass(frozen=True)
class Stage:
    """What one model chunk holds: blocks [start, end), the embedding (``first``), the final
    norm, output layer and loss (``last``). A model built with a Stage names its parameters as
    the whole model does (block i is ``blocks.i``), so checkpoints stay layout-free."""

    start: int
    end: int
    first: bool
    last: bool
    index: int = 0
    """Position of the chunk in model order (0 .. pipeline x virtual - 1)."""

    def owns(self, layer: int) -> bool:
        return self.start <= layer < self.end


def local_stages(bounds: list[tuple[int, int]], pipeline: int, pp_rank: int) -> list[Stage]:
    """This pipeline rank's chunks (one per virtual stage), in the order megatron runs them."""
    virtual = len(bounds) // pipeline
    out = []
    for c in range(virtual):
        i = c * pipeline + pp_rank
        a, b = bounds[i]
        out.append(Stage(a, b, i == 0, i == len(bounds) - 1, i))
    return out
