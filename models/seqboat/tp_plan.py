"""SeqBoat's split: the GAU's hdim (v, r and the rows of W_h); the EMA, the router, z and the
q/k affines are replicated (small, and the router must see whole tokens); hx is a row-
parallel projection of the replicated mx (scatter, then all-reduce)."""

from plait.models.common.tp_plan import COLUMN, REPLICATED, ROW

PLAN = {
    "S": {
        **{f"ema.{p}": REPLICATED for p in ("delta", "alpha", "beta", "gamma", "omega")},
        "w_router": REPLICATED,
        "log_tau": REPLICATED,
        "w_z": REPLICATED,
        "qk_gamma": REPLICATED,
        "qk_beta": REPLICATED,
        "w_v.weight": COLUMN,
        "w_r.weight": COLUMN,
        "w_hx.weight": ROW,
        "w_h.weight": ROW,
    }
}
