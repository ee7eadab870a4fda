"""Gated DeltaNet's split: key heads for G (each rank its key heads and the value heads they
serve: the grouped heads are consecutive, so contiguous splits line up) with the depthwise
convolutions split with their channels; query and key/value heads for Q. The gated norm's
weight (one per value channel of a head, shared by the heads) and Q's per-head q/k norms are
replicated."""

from plait.models.common.tp_plan import COLUMN, REPLICATED, ROW, Split

PLAN = {
    "G": {
        "q_proj.weight": COLUMN,
        "k_proj.weight": COLUMN,
        "v_proj.weight": COLUMN,
        "z_proj.weight": COLUMN,
        "b_proj.weight": Split("column", "one beta per value head"),
        "a_proj.weight": Split("column", "one decay input per value head"),
        "q_conv": Split("column", "depthwise: channel c's taps live with channel c"),
        "k_conv": Split("column", "depthwise"),
        "v_conv": Split("column", "depthwise"),
        "A_log": Split("column", "per value head"),
        "dt_bias": Split("column", "per value head"),
        "norm.weight": Split("replicated", "one weight per channel of a head, shared by heads"),
        "out_proj.weight": ROW,
    },
    "Q": {
        "q_proj.weight": Split("column", "rows [head, (query, gate), dim]: whole heads"),
        "k_proj.weight": COLUMN,
        "v_proj.weight": COLUMN,
        "q_norm.weight": REPLICATED,
        "k_norm.weight": REPLICATED,
        "o_proj.weight": ROW,
    },
}
