"""Mamba-2's split: heads for D (z, x, dt and their per-head parameters, the x channels of
the convolution, the gated norm's weight with its channels; out_proj by rows). B and C are
replicated: every rank computes them whole and picks its heads' groups (a group serves
heads / groups consecutive heads; Bamba has one group). Query and key/value heads for R."""

from plait.models.common.tp_plan import COLUMN, ROW, Split

_BC = Split("replicated", "B and C of every group, computed whole on each rank; grads summed")

PLAN = {
    "D": {
        "z_proj.weight": COLUMN,
        "z_proj.bias": COLUMN,
        "x_proj.weight": COLUMN,
        "x_proj.bias": COLUMN,
        "dt_proj.weight": Split("column", "one dt per head"),
        "dt_proj.bias": COLUMN,
        "bc_proj.weight": _BC,
        "bc_proj.bias": _BC,
        "x_conv": Split("column", "depthwise: channel c's taps live with channel c"),
        "x_conv_bias": COLUMN,
        "bc_conv": _BC,
        "bc_conv_bias": _BC,
        "A_log": Split("column", "per head"),
        "D": Split("column", "per head"),
        "dt_bias": Split("column", "per head"),
        "norm.weight": Split("column", "one weight per channel, with its head"),
        "out_proj.weight": ROW,
        "out_proj.bias": Split("replicated", "added after the all-reduce"),
    },
    "R": {
        "q_proj.weight": COLUMN,
        "k_proj.weight": COLUMN,
        "v_proj.weight": COLUMN,
        "o_proj.weight": ROW,
    },
}
