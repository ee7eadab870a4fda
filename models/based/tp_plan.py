"""Based's split: heads for B and W; channels for C (both halves of the input projection and
the depthwise conv over the same channels, so the conv needs no collective)."""

from plait.models.common.tp_plan import ATTENTION, COLUMN, REPLICATED, ROW, Split

PLAN = {
    "B": {
        "proj.in_proj.weight": Split("column", "rows [head, (q f, k f, v d)]"),
        "proj.out_proj.weight": ROW,
    },
    "W": ATTENTION,
    "C": {
        "in_conv.weight": COLUMN,
        "in_conv.bias": COLUMN,
        "in_gate.weight": COLUMN,
        "in_gate.bias": COLUMN,
        "conv_weight": Split("column", "depthwise: channel c's taps live with channel c"),
        "out_proj.weight": ROW,
        "out_proj.bias": REPLICATED,
    },
}
