"""H3 (``H``) tensors: the projections keep the reference names (q_proj, k_proj, v_proj,
out_proj, with biases); the SSMs go under ``ssm_k_kernel`` (shift SSM: C [H, N] and its skip
``ssm_k_D``) and ``kernel`` (S4D: log_dt, A_real_log, A_imag, C as real pairs [H, N/2, 2])
with the skip ``D``. The reference stores A as inv_A_real/A_imag inside SSKernelDiag; these
are plait's parameterisation, kept as is so the export is exact."""

from __future__ import annotations

from plait.models.common.hf_export import rename

_NAMES = {
    **{f"{p}_proj.{k}": f"{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")},
    "out_proj.weight": "out_proj.weight",
    "out_proj.bias": "out_proj.bias",
    "shift_C": "ssm_k_kernel.C",
    "shift_D": "ssm_k_D",
    "log_dt": "kernel.log_dt",
    "A_real_log": "kernel.A_real_log",
    "A_imag": "kernel.A_imag",
    "C": "kernel.C",
    "D": "D",
}

EXPORTS = {"H": rename(_NAMES)}
