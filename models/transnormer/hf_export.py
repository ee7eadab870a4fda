"""TransNormerLLM (``L``) tensors in the HF layout of its released modeling code: one fused
``qkvu_proj`` whose output is ``chunk(4)`` into q, k, v, u, each "(h d)"; ``out_proj``;
``lrpe.theta`` [H, 1, d] where the layer has LRPE. The released code names the block norms
token_norm/channel_norm; here they are the common skeleton's (SRMSNorm has no weight)."""

from __future__ import annotations

import torch

from plait.models.common.hf_export import LetterExport, State, merge_roles, split_roles


def _to(s: State, cfg, i) -> State:
    d = cfg.head_dim
    q, k, v, u = split_roles(s["proj.in_proj.weight"], cfg.num_heads, (d, d, d, d))
    out = {
        "qkvu_proj.weight": torch.cat([q, k, v, u], 0),
        "out_proj.weight": s["proj.out_proj.weight"],
    }
    if "lrpe.theta" in s:
        out["lrpe.theta"] = s["lrpe.theta"]
    return out


def _from(s: State, cfg, i) -> State:
    d = cfg.head_dim
    parts = list(s["qkvu_proj.weight"].chunk(4, 0))
    out = {
        "proj.in_proj.weight": merge_roles(parts, cfg.num_heads, (d, d, d, d)),
        "proj.out_proj.weight": s["out_proj.weight"],
    }
    if "lrpe.theta" in s:
        out["lrpe.theta"] = s["lrpe.theta"]
    return out


EXPORTS = {"L": LetterExport(_to, _from, hf_class="LightningAttention")}
