"""Bamba's native checkpoint layout: transformers' ``BambaForCausalLM`` (config.json
``model_type: bamba``), which ``AutoModelForCausalLM`` loads without remote code.

Every Bamba layer is one mixer (Mamba-2, or softmax attention at ``attn_layer_indices``)
and one SwiGLU MLP, both pre-norm: plait's block with letter D or R. The conversions:
  * D: plait's ``z_proj``, ``x_proj``, ``bc_proj`` and ``dt_proj`` are the rows of
    ``mamba.in_proj`` in that order ([gate | x | B | C | dt], B and C group-major); plait's
    ``x_conv`` and ``bc_conv`` (and their biases) the rows of the depthwise ``conv1d``
    [channels, 1, K]. plait keeps them apart for tensor parallelism;
  * every other tensor is the same array under another name (Bamba's RMSNorms store the
    weight itself, as plait's do).
Bamba's config fixes ``partial_rotary_factor`` at 0.5 and derives each attention head's
width as hidden_size / num_attention_heads, which ``fits`` checks.
"""

from __future__ import annotations

import math

import torch

from plait.models.common.config import ModelConfig, ModelConfigError
from plait.models.common.hf_export import (
    NativeFields,
    NativeLayout,
    State,
    check_all_mapped,
    native_common_fields,
    rename_skeleton,
)

from .config import Mamba2Options

TYPES = ("bamba",)


def fits(cfg: ModelConfig) -> str:
    other = sorted(set(cfg.pattern) - {"D", "R"})
    if other:
        return f"pattern letters {other} are not Bamba layers (only D and R are)"
    if cfg.mlp != "swiglu" or cfg.norm != "rmsnorm" or cfg.embed_scale:
        return "Bamba's blocks are RMSNorm and SwiGLU without an embedding scale"
    o = cfg.mamba2
    if o.width % cfg.hidden_size:
        return (f"mamba2 width {o.width} (heads x head_dim) is not a whole multiple of "
                f"hidden_size {cfg.hidden_size} (Bamba's mamba_expand)")
    if o.partial_rotary != 0.5:
        return f"mamba2.partial_rotary {o.partial_rotary}; Bamba's is fixed at 0.5"
    if cfg.hidden_size % cfg.num_heads:
        return "Bamba's attention heads are hidden_size / num_attention_heads wide"
    return ""


def config_to_hf(cfg: ModelConfig, vocab: int) -> dict:
    o = cfg.mamba2
    return {
        "model_type": TYPES[0],
        "architectures": ["BambaForCausalLM"],
        **native_common_fields(cfg, vocab),
        "attn_layer_indices": [i for i, c in enumerate(cfg.pattern) if c == "R"],
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": o.kv_heads(cfg),
        "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": o.partial_rotary},
        "mamba_n_heads": o.heads,
        "mamba_d_head": o.head_dim,
        "mamba_n_groups": o.groups,
        "mamba_d_state": o.state,
        "mamba_d_conv": o.conv_kernel,
        "mamba_expand": o.width // cfg.hidden_size,
        "mamba_chunk_size": o.chunk,
        "mamba_conv_bias": o.conv_bias,
        "mamba_proj_bias": o.proj_bias,
        "time_step_limit": [o.dt_min, o.dt_max or math.inf],
    }


def _number(x, what: str) -> float:
    """A config float, also as transformers writes a non-finite one ({"__float__": "Infinity"})."""
    if isinstance(x, dict) and "__float__" in x:
        x = x["__float__"]
    try:
        return float(x)
    except (TypeError, ValueError):
        raise ModelConfigError(f"{what}: {x!r} is not a number") from None


def config_from_hf(t: dict, where: str) -> ModelConfig:
    fields = NativeFields(t, where, "Bamba", eps=1e-5)
    need, common = fields.need, fields.model_kwargs()
    if t.get("mlp_bias", False):
        raise ModelConfigError(f"{where}: mlp_bias true is not Bamba's layer")
    layers, hidden = common["num_layers"], common["hidden_size"]
    attn = [int(i) for i in (t.get("attn_layer_indices") or [])]
    bad = [i for i in attn if not 0 <= i < layers]
    if bad:
        raise ModelConfigError(f"{where}: attn_layer_indices {bad} outside 0..{layers - 1}")
    heads = int(need("num_attention_heads"))
    if hidden % heads:
        raise ModelConfigError(
            f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    ssm_heads = int(need("mamba_n_heads"))
    expand = t.get("mamba_expand", 2)
    d_head = t.get("mamba_d_head", "auto")
    d_head = int(expand * hidden) // ssm_heads if d_head == "auto" else int(d_head)
    if d_head * ssm_heads != int(expand * hidden):
        raise ModelConfigError(
            f"{where}: mamba_d_head {d_head} x mamba_n_heads {ssm_heads} != mamba_expand "
            f"{expand} x hidden_size {hidden}"
        )
    limit = t.get("time_step_limit") or (0.0, math.inf)
    if not isinstance(limit, list | tuple) or len(limit) != 2:
        raise ModelConfigError(f"{where}: time_step_limit {limit!r} is not [min, max]")
    lo, hi = (_number(x, f"{where}: time_step_limit") for x in limit)
    return ModelConfig(
        pattern="".join("R" if i in attn else "D" for i in range(layers)),
        num_heads=heads,
        **common,
        options={"mamba2": Mamba2Options(
            heads=ssm_heads,
            head_dim=d_head,
            groups=int(t.get("mamba_n_groups", 1)),
            state=int(t.get("mamba_d_state", 256)),
            conv_kernel=int(t.get("mamba_d_conv", 4)),
            conv_bias=bool(t.get("mamba_conv_bias", True)),
            proj_bias=bool(t.get("mamba_proj_bias", False)),
            dt_min=lo,
            dt_max=0.0 if math.isinf(hi) else hi,
            attn_kv_heads=int(t.get("num_key_value_heads") or heads),
            partial_rotary=0.5,
        )},
    )


_TOP = {"embedding.weight": "model.embed_tokens.weight",
        "final_norm.weight": "model.final_layernorm.weight", "output.weight": "lm_head.weight"}
_BLOCK = {"mixer_norm.weight": "input_layernorm.weight",
          "mlp_norm.weight": "pre_ff_layernorm.weight",
          "mlp.w1.weight": "feed_forward.gate_proj.weight",
          "mlp.w2.weight": "feed_forward.up_proj.weight",
          "mlp.w3.weight": "feed_forward.down_proj.weight"}
_D = {"A_log": "A_log", "D": "D", "dt_bias": "dt_bias", "norm.weight": "norm.weight",
      "out_proj.weight": "out_proj.weight", "out_proj.bias": "out_proj.bias"}
_R = {k: k for k in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}
_IN = ("z_proj", "x_proj", "bc_proj", "dt_proj")


def _in_sizes(cfg: ModelConfig) -> list[int]:
    o = cfg.mamba2
    return [o.width, o.width, 2 * o.groups * o.state, o.heads]


def to_hf(state: State, cfg: ModelConfig) -> State:
    out = rename_skeleton(state, cfg, _TOP, _BLOCK, to_hf=True)
    for i, letter in enumerate(cfg.pattern):
        m, q = f"blocks.{i}.mixer.", f"model.layers.{i}."
        if letter == "D":
            h = q + "mamba."
            for src, dst in _D.items():
                if m + src in state:
                    out[h + dst] = state[m + src]
            for kind in ("weight", "bias"):
                if f"{m}x_proj.{kind}" in state:
                    out[f"{h}in_proj.{kind}"] = torch.cat([state[f"{m}{n}.{kind}"] for n in _IN])
            out[h + "conv1d.weight"] = torch.cat([state[m + "x_conv"], state[m + "bc_conv"]])[
                :, None
            ]
            if m + "x_conv_bias" in state:
                out[h + "conv1d.bias"] = torch.cat(
                    [state[m + "x_conv_bias"], state[m + "bc_conv_bias"]]
                )
        else:
            for src, dst in _R.items():
                out[f"{q}self_attn.{dst}"] = state[m + src]
    check_all_mapped(state, out, "Bamba", lambda hf: from_hf(hf, cfg))
    return out


def from_hf(hf: State, cfg: ModelConfig) -> State:
    """The inverse of ``to_hf``."""
    o = cfg.mamba2
    conv_sizes = [o.width, 2 * o.groups * o.state]
    out = rename_skeleton(hf, cfg, _TOP, _BLOCK, to_hf=False)
    for i, letter in enumerate(cfg.pattern):
        m, q = f"blocks.{i}.mixer.", f"model.layers.{i}."
        if letter == "D":
            h = q + "mamba."
            for src, dst in _D.items():
                if h + dst in hf:
                    out[m + src] = hf[h + dst]
            for kind in ("weight", "bias"):
                if f"{h}in_proj.{kind}" in hf:
                    parts = hf[f"{h}in_proj.{kind}"].split(_in_sizes(cfg), 0)
                    for n, w in zip(_IN, parts, strict=True):
                        out[f"{m}{n}.{kind}"] = w
            out[m + "x_conv"], out[m + "bc_conv"] = hf[h + "conv1d.weight"][:, 0].split(
                conv_sizes, 0
            )
            if h + "conv1d.bias" in hf:
                out[m + "x_conv_bias"], out[m + "bc_conv_bias"] = hf[h + "conv1d.bias"].split(
                    conv_sizes, 0
                )
        else:
            for src, dst in _R.items():
                out[m + src] = hf[f"{q}self_attn.{dst}"]
    return out


NATIVE = NativeLayout(
    architecture="BambaForCausalLM",
    model_types=TYPES,
    fits=fits,
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    to_hf=to_hf,
    from_hf=from_hf,
)
