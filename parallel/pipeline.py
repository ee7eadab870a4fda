"""Pipeline stages: how a stack of layers is cut into contiguous stages, and the bubble.

Pure arithmetic (no process group): the stage balancer that ``python -m plait.launcher.plan``
prints and the pipeline schedules will use. Costs come from the caller (the families' cost
estimates at the run's sequence length; a softmax layer at 32K does not cost what a lightning
layer does), so this module knows nothing of the models.
"""

from __future__ import annotations


def balance(costs: list[float], stages: int, last_extra: float = 0.0,
            first_extra: float = 0.0) -> list[tuple[int, int]]:  # fmt: skip
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


def bubble_fraction(stages: int, micro_batches: int, virtual: int = 1) -> float:
    """Idle fraction of a step under 1F1B, (p - 1) / (m + p - 1); interleaved with v model
    chunks per rank, (p - 1) / (v m + p - 1) (Narayanan et al., 2021)."""
    p, m, v = stages, micro_batches, virtual
    return (p - 1) / (v * m + p - 1)
