"""Qwen3.5's native checkpoint layout: transformers' ``Qwen3_5ForCausalLM`` (config.json
``model_type: qwen3_5_text``), which ``AutoModelForCausalLM`` loads without remote code.

Import takes the text model of a released directory: a ``qwen3_5_text`` config, or a
``qwen3_5`` (vision-language) config's ``text_config`` with its tensors under
``model.language_model.``; the vision tower (``model.visual.*``) and the multi-token-
prediction layer (``mtp.*``) are left out, as ``Qwen3_5ForCausalLM`` itself leaves them.
Export writes the text model. The conversions (the same function on both sides):
  * q, k, v: plait's ``q_proj``, ``k_proj``, ``v_proj`` and ``q_conv``, ``k_conv``,
    ``v_conv`` are the rows of ``in_proj_qkv`` and of the depthwise ``conv1d`` [C, 1, K],
    in that order (plait keeps them apart for tensor parallelism);
  * the zero-centred RMSNorms (blocks, final, q_norm, k_norm) compute x * (1 + w); plait's
    weight is 1 + w. The gated norm inside G is a plain weight on both sides.
"""

from __future__ import annotations

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

from .config import GdnOptions

TYPES = ("qwen3_5_text", "qwen3_5")
_ZERO_CENTRED = ("input_layernorm", "post_attention_layernorm", "q_norm", "k_norm")


def fits(cfg: ModelConfig) -> str:
    other = sorted(set(cfg.pattern) - {"G", "Q"})
    if other:
        return f"pattern letters {other} are not Qwen3.5 layers (only G and Q are)"
    if cfg.mlp != "swiglu" or cfg.norm != "rmsnorm" or cfg.embed_scale:
        return "Qwen3.5's blocks are RMSNorm and SwiGLU without an embedding scale"
    return ""


def config_to_hf(cfg: ModelConfig, vocab: int) -> dict:
    o = cfg.gdn
    return {
        "model_type": TYPES[0],
        "architectures": ["Qwen3_5ForCausalLM"],
        **native_common_fields(cfg, vocab),
        "layer_types": ["linear_attention" if c == "G" else "full_attention" for c in cfg.pattern],
        "num_attention_heads": o.heads(cfg),
        "num_key_value_heads": o.kv_heads(cfg),
        "head_dim": o.head_dim(cfg),
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": o.partial_rotary},
        "linear_conv_kernel_dim": o.conv_kernel,
        "linear_key_head_dim": o.key_dim,
        "linear_value_head_dim": o.value_dim,
        "linear_num_key_heads": o.key_heads,
        "linear_num_value_heads": o.value_heads,
    }


def text_config(config: dict) -> dict:
    """The text model's fields of a ``qwen3_5_text`` or ``qwen3_5`` config.json."""
    if config.get("model_type") != "qwen3_5":
        return config
    text = dict(config.get("text_config") or {})
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    return text


def config_from_hf(config: dict, where: str) -> ModelConfig:
    t = text_config(config)
    fields = NativeFields(t, where, "Qwen3.5 text", eps=1e-6)
    need, common, rope = fields.need, fields.model_kwargs(), fields.rope()
    layers = common["num_layers"]
    types = t.get("layer_types") or [
        "full_attention" if (i + 1) % int(t.get("full_attention_interval", 4)) == 0
        else "linear_attention" for i in range(layers)
    ]
    unknown = sorted(set(types) - {"linear_attention", "full_attention"})
    if unknown or len(types) != layers:
        raise ModelConfigError(f"{where}: layer_types {unknown or types} (one per layer, "
                               "linear_attention or full_attention)")
    hidden, heads = common["hidden_size"], int(need("num_attention_heads"))
    head_dim = int(t.get("head_dim") or hidden // heads)
    num_heads = heads if hidden % heads == 0 else (hidden // head_dim if hidden % head_dim == 0
                                                  else 1)
    return ModelConfig(
        pattern="".join("G" if x == "linear_attention" else "Q" for x in types),
        num_heads=num_heads,
        **common,
        options={"gdn": GdnOptions(
            key_heads=int(need("linear_num_key_heads")),
            value_heads=int(need("linear_num_value_heads")),
            key_dim=int(need("linear_key_head_dim")),
            value_dim=int(need("linear_value_head_dim")),
            conv_kernel=int(t.get("linear_conv_kernel_dim", 4)),
            attn_heads=heads,
            attn_kv_heads=int(t.get("num_key_value_heads") or heads),
            attn_head_dim=head_dim,
            partial_rotary=float(rope.get("partial_rotary_factor",
                                          t.get("partial_rotary_factor", 0.25))),
        )},
    )


_TOP = {"embedding.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"mixer_norm.weight": "input_layernorm.weight",
          "mlp_norm.weight": "post_attention_layernorm.weight",
          "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w2.weight": "mlp.up_proj.weight",
          "mlp.w3.weight": "mlp.down_proj.weight"}
_G = {"z_proj.weight": "in_proj_z.weight", "b_proj.weight": "in_proj_b.weight",
      "a_proj.weight": "in_proj_a.weight", "A_log": "A_log", "dt_bias": "dt_bias",
      "norm.weight": "norm.weight", "out_proj.weight": "out_proj.weight"}
_Q = {k: k for k in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                     "q_norm.weight", "k_norm.weight")}


def _centred(name: str) -> bool:
    return name == "model.norm.weight" or name.rsplit(".", 2)[-2] in _ZERO_CENTRED


def to_hf(state: State, cfg: ModelConfig) -> State:
    out = rename_skeleton(state, cfg, _TOP, _BLOCK, to_hf=True)
    for i, letter in enumerate(cfg.pattern):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        if letter == "G":
            m, h = p + "mixer.", q + "linear_attn."
            for src, dst in _G.items():
                out[h + dst] = state[m + src]
            qkv = [state[m + f"{r}_proj.weight"] for r in "qkv"]
            out[h + "in_proj_qkv.weight"] = torch.cat(qkv)
            out[h + "conv1d.weight"] = torch.cat([state[m + f"{r}_conv"] for r in "qkv"])[:, None]
        else:
            for src, dst in _Q.items():
                out[f"{q}self_attn.{dst}"] = state[f"{p}mixer.{src}"]
    out = {k: (v - 1 if _centred(k) else v) for k, v in out.items()}
    check_all_mapped(state, out, "Qwen3.5", lambda hf: from_hf(hf, cfg))
    return out


def from_hf(hf: State, cfg: ModelConfig) -> State:
    """The inverse of ``to_hf``; accepts the vision-language checkpoints' text prefix
    (``model.language_model.``) and leaves out ``model.visual.*`` and ``mtp.*``."""
    hf = {
        ("model." + k[len("model.language_model."):] if k.startswith("model.language_model.")
         else k): v
        for k, v in hf.items()
        if not k.startswith(("model.visual.", "mtp."))
    }
    hf = {k: (v + 1 if _centred(k) else v) for k, v in hf.items()}
    o = cfg.gdn
    out = rename_skeleton(hf, cfg, _TOP, _BLOCK, to_hf=False)
    for i, letter in enumerate(cfg.pattern):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        if letter == "G":
            m, h = p + "mixer.", q + "linear_attn."
            for src, dst in _G.items():
                out[m + src] = hf[h + dst]
            sizes = [o.key_heads * o.key_dim] * 2 + [o.value_heads * o.value_dim]
            for r, w in zip("qkv", hf[h + "in_proj_qkv.weight"].split(sizes, 0), strict=True):
                out[m + f"{r}_proj.weight"] = w
            conv = hf[h + "conv1d.weight"][:, 0]
            for r, w in zip("qkv", conv.split(sizes, 0), strict=True):
                out[m + f"{r}_conv"] = w
        else:
            for src, dst in _Q.items():
                out[f"{p}mixer.{src}"] = hf[f"{q}self_attn.{dst}"]
    return out


NATIVE = NativeLayout(
    architecture="Qwen3_5ForCausalLM",
    model_types=TYPES,
    fits=fits,
    config_to_hf=config_to_hf,
    config_from_hf=config_from_hf,
    to_hf=to_hf,
    from_hf=from_hf,
)
