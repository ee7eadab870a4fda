"""Based tensors in the layout of its reference code (HazyResearch/based):
B: ``proj_q`` [H*f], ``proj_k`` [H*f], ``proj_v`` [H*d], ``out_proj``;
W: flash-attn's fused ``Wqkv`` ([q; k; v], each "(h d)") and ``out_proj``;
C: BaseConv's ``in_proj`` = [conv half; gate half] (weight and bias), the depthwise
   ``conv.conv.weight`` [inner, 1, K], ``out_proj`` (weight and bias)."""

from __future__ import annotations

import torch

from plait.models.common.hf_export import LetterExport, State, merge_roles, split_roles


def _b_to(s: State, cfg, i) -> State:
    f, d = cfg.based.feature_dim, cfg.head_dim
    q, k, v = split_roles(s["proj.in_proj.weight"], cfg.num_heads, (f, f, d))
    return {"proj_q.weight": q, "proj_k.weight": k, "proj_v.weight": v,
            "out_proj.weight": s["proj.out_proj.weight"]}


def _b_from(s: State, cfg, i) -> State:
    f, d = cfg.based.feature_dim, cfg.head_dim
    parts = [s["proj_q.weight"], s["proj_k.weight"], s["proj_v.weight"]]
    return {"proj.in_proj.weight": merge_roles(parts, cfg.num_heads, (f, f, d)),
            "proj.out_proj.weight": s["out_proj.weight"]}


def _w_to(s: State, cfg, i) -> State:
    """W inherits ``softmax.bias``: biases, when present, go with their weights."""
    d, out = cfg.head_dim, {}
    for kind in ("weight", "bias"):
        if f"proj.in_proj.{kind}" in s:
            qkv = split_roles(s[f"proj.in_proj.{kind}"], cfg.num_heads, (d, d, d))
            out[f"Wqkv.{kind}"] = torch.cat(qkv, 0)
        if f"proj.out_proj.{kind}" in s:
            out[f"out_proj.{kind}"] = s[f"proj.out_proj.{kind}"]
    return out


def _w_from(s: State, cfg, i) -> State:
    d, out = cfg.head_dim, {}
    for kind in ("weight", "bias"):
        if f"Wqkv.{kind}" in s:
            parts = list(s[f"Wqkv.{kind}"].chunk(3, 0))
            out[f"proj.in_proj.{kind}"] = merge_roles(parts, cfg.num_heads, (d, d, d))
        if f"out_proj.{kind}" in s:
            out[f"proj.out_proj.{kind}"] = s[f"out_proj.{kind}"]
    return out


def _c_to(s: State, cfg, i) -> State:
    return {
        "in_proj.weight": torch.cat([s["in_conv.weight"], s["in_gate.weight"]], 0),
        "in_proj.bias": torch.cat([s["in_conv.bias"], s["in_gate.bias"]], 0),
        "conv.conv.weight": s["conv_weight"][:, None, :],
        "out_proj.weight": s["out_proj.weight"],
        "out_proj.bias": s["out_proj.bias"],
    }


def _c_from(s: State, cfg, i) -> State:
    wa, wb = s["in_proj.weight"].chunk(2, 0)
    ba, bb = s["in_proj.bias"].chunk(2, 0)
    return {
        "in_conv.weight": wa, "in_gate.weight": wb, "in_conv.bias": ba, "in_gate.bias": bb,
        "conv_weight": s["conv.conv.weight"][:, 0, :],
        "out_proj.weight": s["out_proj.weight"], "out_proj.bias": s["out_proj.bias"],
    }


EXPORTS = {
    "B": LetterExport(_b_to, _b_from, hf_class="BasedLinearAttention"),
    "W": LetterExport(_w_to, _w_from, hf_class="SlidingWindowAttention"),
    "C": LetterExport(_c_to, _c_from, hf_class="GatedShortConv"),
}
