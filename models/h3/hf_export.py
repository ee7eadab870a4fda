"""H3 (``H``) tensors in the released layout (HazyResearch/H3's ``H3`` module): projections
``q_proj``/``k_proj``/``v_proj``/``output_linear`` with biases; the shift SSM under
``ssm_k_kernel.kernel`` (C [1, d, N], B [d, N]) with its skip ``ssm_k_D`` [d]; the S4D kernel
under ``kernel.kernel`` (log_dt [H], inv_A_real and A_imag [H, N/2], B [H, N/2, 2] and
C [1, H, N/2, 2] as real pairs) with its skip ``D`` [H].

plait's A_real_log is the release's inv_A_real (A_real = -exp of it). plait has no B (its C
is the released C * B, resp. the B-C cross-correlation of the shift SSM), so the export
writes B = 1 (S4D) and B = e_1 (shift), with which the released kernels equal plait's, and
the import folds whatever B it finds into C. The readout's channels are (h d) in plait and
(d h) in the released Python path: the export permutes output_linear's columns (a no-op at
head_dim 1, every released checkpoint).
"""

from __future__ import annotations

import torch

from plait.models.common.hf_export import LetterExport, State

_SAME = {
    **{f"{p}_proj.{k}": f"{p}_proj.{k}" for p in "qkv" for k in ("weight", "bias")},
    "out_proj.bias": "output_linear.bias",
    "shift_D": "ssm_k_D",
    "log_dt": "kernel.kernel.log_dt",
    "A_real_log": "kernel.kernel.inv_A_real",
    "A_imag": "kernel.kernel.A_imag",
    "D": "D",
}
_CONSTANTS = ("ssm_k_kernel.kernel.B", "kernel.kernel.B")


def _heads(cfg) -> tuple[int, int]:
    d = cfg.h3.head_dim
    return cfg.hidden_size // d, d


def _to_hf(s: State, cfg, i: int) -> State:
    missing = sorted(set(s) - set(_SAME) - {"out_proj.weight", "shift_C", "C"})
    if missing:
        raise KeyError(f"to_hf: no HF name for mixer tensors {missing}")
    H, d = _heads(cfg)
    out = {_SAME[k]: v for k, v in s.items() if k in _SAME}
    w = s["out_proj.weight"]
    out["output_linear.weight"] = w.view(-1, H, d).transpose(1, 2).reshape(w.shape)
    C = s["shift_C"]
    out["ssm_k_kernel.kernel.C"] = C[None]
    out["ssm_k_kernel.kernel.B"] = torch.zeros_like(C).index_fill_(1, torch.tensor([0]), 1.0)
    out["kernel.kernel.C"] = s["C"][None]
    out["kernel.kernel.B"] = torch.stack(
        [torch.ones_like(s["A_imag"]), torch.zeros_like(s["A_imag"])], -1
    )
    return out


def _from_hf(s: State, cfg, i: int) -> State:
    H, d = _heads(cfg)
    back = {v: k for k, v in _SAME.items()}
    out = {back[k]: v for k, v in s.items() if k in back}
    w = s["output_linear.weight"]
    out["out_proj.weight"] = w.view(-1, d, H).transpose(1, 2).reshape(w.shape)
    # Shift SSM: the kernel is the cross-correlation k[l] = sum_n B[n] C[n + l].
    B, C = s["ssm_k_kernel.kernel.B"], s["ssm_k_kernel.kernel.C"][0]
    N = C.shape[1]
    out["shift_C"] = torch.stack([(B[:, : N - lag] * C[:, lag:]).sum(1) for lag in range(N)], 1)
    # S4D: the kernel depends on C * B only.
    Bc = torch.view_as_complex(s["kernel.kernel.B"].contiguous())
    Cc = torch.view_as_complex(s["kernel.kernel.C"][0].contiguous())
    out["C"] = torch.view_as_real(Cc * Bc).contiguous()
    return out


EXPORTS = {"H": LetterExport(_to_hf, _from_hf, _CONSTANTS, hf_class="H3Mixer")}
