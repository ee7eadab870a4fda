"""SeqBoat (``S``) tensors in the layout of the released ``SeqBoatUnit`` (renll/SeqBoat,
fairseq/modules/seqboat_unit.py), so a checkpoint maps onto the authors' module one to one:

- ``move.{delta,alpha,beta}`` [hidden, N, 1], ``move.gamma`` [hidden, N], ``move.omega``
  [hidden]: the EMA (plait keeps delta, alpha, beta as [hidden, N]);
- ``mx_proj.weight`` / ``.bias``: rows [z | r | v] (zdim, hdim, hdim), the order of the
  released split of SiLU(mx_proj(mx));
- ``hx_proj.weight`` / ``.bias``: rows [router logits (2) | hx (hidden)];
- ``h_proj.weight`` / ``.bias``; ``gamma``, ``beta`` [2, zdim] (row 0 for q, row 1 for k);
- ``q_router.temp`` [1]: the router's log-temperature.

plait keeps these projections apart because they split differently under TP (z and the router
replicated, r and v column-parallel, hx row-parallel). Without biases (``seqboat.bias:
false``) the ``.bias`` tensors are simply absent.

Rotary: plait rotates halves, channel i with channel i + zdim/2; the released code rotates
interleaved pairs (2i, 2i+1), both at frequency theta^(-2i/zdim). Released channel 2i is
plait's channel i and released 2i+1 is plait's i + zdim/2 (``interleave``); z is elementwise
up to its projection and the q/k affines, so permuting z's rows of ``mx_proj`` and the
columns of ``gamma`` and ``beta`` gives the released function exactly (the attention scores
are sums over the channels, unchanged by a common permutation)."""

from __future__ import annotations

import torch

from plait.models.common.hf_export import LetterExport, State

_EMA = ("delta", "alpha", "beta", "gamma", "omega")
_EMA_3D = ("delta", "alpha", "beta")  # [hidden, N, 1] in the released module
_PROJ = ("w_v", "w_r", "w_hx", "w_h")


def interleave(zdim: int) -> torch.Tensor:
    """Channel order [0, zdim/2, 1, zdim/2 + 1, ...]: released z = plait z[interleave]."""
    return torch.arange(zdim).view(2, zdim // 2).t().reshape(-1)


def _known(cfg) -> set[str]:
    names = {f"ema.{p}" for p in _EMA} | {"w_router", "log_tau", "w_z", "qk_gamma", "qk_beta"}
    names |= {f"{p}.weight" for p in _PROJ}
    if cfg.seqboat.bias:
        names |= {"b_router", "b_z"} | {f"{p}.bias" for p in _PROJ}
    return names


def _to_hf(s: State, cfg, i: int) -> State:
    unknown = sorted(set(s) - _known(cfg))
    if unknown:
        raise KeyError(f"to_hf: no HF name for mixer tensors {unknown}")
    perm = interleave(cfg.seqboat.zdim)
    out = {f"move.{p}": s[f"ema.{p}"][..., None] if p in _EMA_3D else s[f"ema.{p}"] for p in _EMA}
    out["mx_proj.weight"] = torch.cat([s["w_z"][perm], s["w_r.weight"], s["w_v.weight"]])
    out["hx_proj.weight"] = torch.cat([s["w_router"], s["w_hx.weight"]])
    out["h_proj.weight"] = s["w_h.weight"]
    if cfg.seqboat.bias:
        out["mx_proj.bias"] = torch.cat([s["b_z"][perm], s["w_r.bias"], s["w_v.bias"]])
        out["hx_proj.bias"] = torch.cat([s["b_router"], s["w_hx.bias"]])
        out["h_proj.bias"] = s["w_h.bias"]
    out["gamma"], out["beta"] = s["qk_gamma"][:, perm], s["qk_beta"][:, perm]
    out["q_router.temp"] = s["log_tau"]
    return out


def _from_hf(s: State, cfg, i: int) -> State:
    o = cfg.seqboat
    back = torch.argsort(interleave(o.zdim))
    hdim = o.value_dim(cfg.hidden_size)
    dims = [o.zdim, hdim, hdim]
    out = {f"ema.{p}": s[f"move.{p}"][..., 0] if p in _EMA_3D else s[f"move.{p}"] for p in _EMA}
    z, r, v = s["mx_proj.weight"].split(dims)
    u, hx = s["hx_proj.weight"].split([2, cfg.hidden_size])
    out.update({"w_z": z[back], "w_r.weight": r, "w_v.weight": v,
                "w_router": u, "w_hx.weight": hx, "w_h.weight": s["h_proj.weight"]})
    if o.bias:
        bz, br, bv = s["mx_proj.bias"].split(dims)
        bu, bhx = s["hx_proj.bias"].split([2, cfg.hidden_size])
        out.update({"b_z": bz[back], "w_r.bias": br, "w_v.bias": bv,
                    "b_router": bu, "w_hx.bias": bhx, "w_h.bias": s["h_proj.bias"]})
    out["qk_gamma"], out["qk_beta"] = s["gamma"][:, back], s["beta"][:, back]
    out["log_tau"] = s["q_router.temp"]
    return out


EXPORTS = {"S": LetterExport(_to_hf, _from_hf, hf_class="SeqBoatMixer")}
