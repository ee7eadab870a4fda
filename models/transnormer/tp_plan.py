"""TransNormerLLM's split: whole heads per rank; the full-width output norm then sums the
squares over the TP group (one [B, T, 1] all-reduce per layer, ``sum_over_tp``)."""

from plait.models.common.tp_plan import ROW, Split

PLAN = {
    "L": {
        "proj.in_proj.weight": Split("column", "rows [head, (q, k, v, u), dim]"),
        "proj.out_proj.weight": ROW,
        "lrpe.theta": Split("column", "[heads, 1, dim]: each rank its heads' frequencies"),
    }
}
