"""Reference gated delta rule (Yang, Kautz & Hatamizadeh, 2024; Qwen3-Next / Qwen3.5's linear
layers), token by token.

With the state S_t [K, V] per head, a log-decay g_t <= 0 and a write strength beta_t:

    S_t = exp(g_t) S_{t-1}                                          (forget)
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T                      (delta-rule write)
    o_t = S_t^T (scale q_t)

i.e. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, and S restarts at 0
where a new document starts. An initial state S_0 is continued by each row's first document;
the final state is the state after the last token (of the last document). This is the
release's ``torch_recurrent_gated_delta_rule`` (transformers' qwen3_5) written over
plait's [B, H, T, D] layout with documents; q and k are taken as given (the L2 norm and the
grouped-head repeat are the mixer's). Obviously correct and O(T) Python steps: for tests,
tiny shapes and decoding.
"""

from __future__ import annotations

import torch


def gated_delta_recurrent(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTV: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHKV: torch.Tensor | None = None,
    return_state: bool = False,
    scale: float | None = None,
):
    """The recurrence above in float32 (float64 if given). Returns o, or (o, final state)."""
    acc = torch.promote_types(q_BHTK.dtype, torch.float32)
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(acc) for x in (q_BHTK, k_BHTK, v_BHTV, g_BHT, beta_BHT))
    S = (
        initial_state_BHKV.to(acc)
        if initial_state_BHKV is not None
        else q.new_zeros(B, H, K, V)
    )
    outs = []
    for t in range(T):
        if doc_ids_BT is not None and t > 0:
            keep = (doc_ids_BT[:, t] == doc_ids_BT[:, t - 1]).to(acc)[:, None, None, None]
            S = S * keep
        S, o = gated_delta_step_fn(q[:, :, t] * scale, k[:, :, t], v[:, :, t], g[:, :, t],
                                   beta[:, :, t], S)
        outs.append(o)
    out = torch.stack(outs, dim=2).to(q_BHTK.dtype)
    return (out, S) if return_state else out


def gated_delta_step_fn(q_BHK, k_BHK, v_BHV, g_BH, beta_BH, S_BHKV):
    """One token (q already scaled): returns (new state, output), all in the state's dtype."""
    S = S_BHKV * g_BH.exp()[..., None, None]
    kv_mem = torch.einsum("bhkv,bhk->bhv", S, k_BHK)
    delta = (v_BHV - kv_mem) * beta_BH[..., None]
    S = S + k_BHK[..., :, None] * delta[..., None, :]
    return S, torch.einsum("bhkv,bhk->bhv", S, q_BHK)
