"""SeqBoat (``S``) tensors, named after Mega/SeqBoat's modules: the EMA is ``move`` (delta,
alpha, beta, gamma, omega), the router ``router``, the GAU's projections ``z_proj``,
``v_proj``, ``r_proj``, ``hx_proj``, ``h_proj`` and the q/k affine ``qk_gamma``/``qk_beta``
[2, zdim] (row 0 for q, row 1 for k). The reference fuses z, r and hx into one ``mx_proj``;
plait keeps them apart because they split differently under TP."""

from __future__ import annotations

from plait.models.common.hf_export import rename

_NAMES = {
    **{f"ema.{p}": f"move.{p}" for p in ("delta", "alpha", "beta", "gamma", "omega")},
    "w_router": "router.weight",
    "log_tau": "router.log_tau",
    "w_z": "z_proj.weight",
    "qk_gamma": "qk_gamma",
    "qk_beta": "qk_beta",
    "w_v.weight": "v_proj.weight",
    "w_r.weight": "r_proj.weight",
    "w_hx.weight": "hx_proj.weight",
    "w_h.weight": "h_proj.weight",
}

EXPORTS = {"S": rename(_NAMES)}
