"""Letter M of a plait export: mixture-of-head attention (MoH), the HF-side module of
models/moh/mixer.py.

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .plait_layers import apply_rotary, attend_cached, kv_cache, rotary_cos_sin, wide


class _MoHRouter(nn.Module):
    """The learned routers of SkyworkAI/MoH's ViT/DiT attention, per token x:

        p        = softmax(routed x)                       over the R routed heads
        g_routed = k * renorm(p * topk_mask(p))            the top-k heads, summing to k
        g_shared = S * softmax(shared x)                   over the S shared heads
        alpha    = 2 * softmax(mix x)                      shared versus routed
        gates    = [alpha_0 * g_shared, alpha_1 * g_routed]

    so every active head's gate is 1 when the routers are uniform (MoH then equals
    multi-head attention). ``moh.gates: paper`` drops the factors k, S and 2. With one shared
    head its softmax would be the constant 1 (no ``shared`` weights); without shared heads
    there is no ``mix`` and the gates are k * renorm(...) alone. Computed in float32."""

    def __init__(self, hidden: int, shared: int, routed: int, top_k: int, scaled: bool):
        super().__init__()
        self.top_k, self.scaled = top_k, scaled
        self.routed = nn.Linear(hidden, routed, bias=False)
        self.shared = nn.Linear(hidden, shared, bias=False) if shared > 1 else None
        self.mix = nn.Linear(hidden, 2, bias=False) if shared else None
        self.num_shared = shared

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        """Gates [B, T, shared + routed], 0 on the routed heads a token did not select."""
        x = wide(x_BTC)

        def logits(layer: nn.Linear) -> torch.Tensor:
            return F.linear(x, layer.weight.to(x.dtype))

        p = F.softmax(logits(self.routed), dim=-1)
        top = p.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
        routed = p * mask
        routed = routed / routed.sum(-1, keepdim=True)
        k = self.top_k if self.scaled else 1
        if self.mix is None:
            return routed * k
        alpha = F.softmax(logits(self.mix), dim=-1) * (2 if self.scaled else 1)
        if self.shared is None:
            shared = torch.ones_like(alpha[..., :1])
        else:
            shared = F.softmax(logits(self.shared), dim=-1)
            shared = shared * (self.num_shared if self.scaled else 1)
        return torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed * k], dim=-1)


def _query_norm_gates(q_BHTD: torch.Tensor, shared: int, top_k: int) -> torch.Tensor:
    """MoH-LLaMA3's parameter-free router: gates [B, T, heads], 1 on the shared heads and on
    the top_k routed heads whose (pre-rotary) query has the largest L2 norm, 0 elsewhere (the
    release ranks softmax(norms / std(norms)), a monotone map of the norms, and keeps the
    top-k indicator only)."""
    norms = q_BHTD.detach().float().norm(dim=-1).transpose(1, 2)  # [B, T, heads]
    top = norms[..., shared:].topk(top_k, dim=-1).indices + shared
    gates = torch.zeros_like(norms).scatter_(-1, top, 1.0)
    gates[..., :shared] = 1.0
    return gates


class MoHAttention(nn.Module):
    """Letter M, mixture-of-head attention: LLaMA's attention (q, k, v, rotary, causal
    softmax, o_proj) whose output is a gated sum of heads,

        out_t = o_proj(concat_h(g_{t,h} * head_h(t))),

    heads 0 .. shared-1 always on, the routed ones on for the top-k of each token (gate 0
    elsewhere). ``moh.router: learned`` gives soft gates from the routers above;
    ``query_norm`` picks the routed heads by query norm with 0/1 gates. Like the released
    code, every head is computed and multiplied by its gate (plait skips the unselected
    queries instead: the same function). The balance loss is a training term and is not
    computed here.

    State: the KV cache of every head and which cached keys are padding. A routed head skips
    queries, not keys: any later token may select any head, so every head's keys stay. The
    gates depend only on the token itself, so a step needs nothing else. Padding keys are
    masked; a padding token's own gates only scale its own (ignored) output."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.options("moh")
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.shared = opts.get("shared_heads", 2)
        self.top_k = opts.get("top_k", 2)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.rope_theta = config.rope_theta
        self.router = None
        if opts.get("router", "learned") == "learned":
            scaled = opts.get("gates", "released") == "released"
            routed = self.heads - self.shared
            self.router = _MoHRouter(h, self.shared, routed, self.top_k, scaled)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape

        def heads(t):
            return t.view(B, T, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x_BTC)), heads(self.k_proj(x_BTC)), heads(self.v_proj(x_BTC))
        if self.router is None:
            gates_BTH = _query_norm_gates(q, self.shared, self.top_k)
        else:
            gates_BTH = self.router(x_BTC)
        cos, sin = rotary_cos_sin(positions_BT, self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        state = kv_cache(state, k, v, pad_BT)
        o = attend_cached(q, state["k"], state["v"], state["pad"])  # [B, H, T, D]
        o = o * gates_BTH.transpose(1, 2)[..., None].to(o.dtype)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state
