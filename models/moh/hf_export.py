"""MoH (``M``) tensors: LLaMA's attention names (q_proj, k_proj, v_proj, o_proj; heads
0..shared-1 are the shared ones) plus the router: ``router.routed.weight`` [routed, d],
``router.shared.weight`` [shared, d] (two or more shared heads), ``router.mix.weight`` [2, d]
(the shared-versus-routed weights)."""

from __future__ import annotations

from plait.models.common.hf_export import ATTENTION, LetterExport, State

_ROUTER = {"w_routed": "router.routed.weight", "w_shared": "router.shared.weight",
           "w_mix": "router.mix.weight"}


def _to(s: State, cfg, i) -> State:
    out = ATTENTION.to_hf({k: v for k, v in s.items() if k.startswith("proj.")}, cfg, i)
    out.update({_ROUTER[k]: v for k, v in s.items() if k in _ROUTER})
    return out


def _from(s: State, cfg, i) -> State:
    back = {v: k for k, v in _ROUTER.items()}
    out = ATTENTION.from_hf({k: v for k, v in s.items() if k not in back}, cfg, i)
    out.update({back[k]: v for k, v in s.items() if k in back})
    return out


EXPORTS = {"M": LetterExport(_to, _from, hf_class="MoHAttention")}
