"""H3's split: heads of ``h3.head_dim`` channels; every SSM parameter is per head, so it is
split with its head and the SSM convolutions need no collective."""

from plait.models.common.tp_plan import COLUMN, REPLICATED, ROW

PLAN = {
    "H": {
        **{f"{p}_proj.{k}": COLUMN for p in "qkv" for k in ("weight", "bias")},
        "out_proj.weight": ROW,
        "out_proj.bias": REPLICATED,
        **{n: COLUMN for n in ("shift_C", "shift_D", "log_dt", "A_real_log", "A_imag", "C", "D")},
    }
}
