"""SeqBoat's split: the GAU's hdim (v, r and their biases, the rows of W_h); the EMA, the
router, z and the q/k affines are replicated (small, and the router must see whole tokens);
hx is a row-parallel projection of the replicated mx (scatter, then all-reduce). The
row-parallel biases (hx's, W_h's) are added once after the all-reduce, so every rank holds
them whole."""

from plait.models.common.tp_plan import COLUMN, REPLICATED, ROW, Split

_AFTER_REDUCE = Split("replicated", "a row-parallel layer's bias, added after the all-reduce")

PLAN = {
    "S": {
        **{f"ema.{p}": REPLICATED for p in ("delta", "alpha", "beta", "gamma", "omega")},
        "w_router": REPLICATED,
        "b_router": REPLICATED,
        "log_tau": REPLICATED,
        "w_z": REPLICATED,
        "b_z": REPLICATED,
        "qk_gamma": REPLICATED,
        "qk_beta": REPLICATED,
        "w_v.weight": COLUMN,
        "w_v.bias": COLUMN,
        "w_r.weight": COLUMN,
        "w_r.bias": COLUMN,
        "w_hx.weight": ROW,
        "w_hx.bias": _AFTER_REDUCE,
        "w_h.weight": ROW,
        "w_h.bias": _AFTER_REDUCE,
    }
}
