"""Reference causal linear attention with per-head exponential decay.

    o_t = sum_{j <= t, doc(j) = doc(t)} lambda_h^(t - j) (q_t . k_j) v_j
          + [doc(t) = doc(0)] lambda_h^(t + 1) q_t S_0,          lambda_h = exp(-s_h), s_h >= 0

S_0 is an optional initial state [B, H, D, E] that the first document of each row continues
(the sequence-parallel schemes and generation hand one in); the final state is the state after
the last token, of the last document. Written as one masked quadratic product so that it is
obviously correct; O(T^2) memory, for tests and tiny shapes only.

With a per-token log-decay ``g`` [B, H, T] (g_t <= 0, Mamba-2's dt_t A_h) token t's decay is
a_t = exp(g_t - s_h), and every power of lambda above becomes a product of the a's in between:
lambda_h^(t - j) -> exp(G_t - G_j), lambda_h^(t + 1) -> exp(G_t), with G the inclusive running
sum of g - s along the row. The constant-slope form is kept as it was (``g=None``), so its
results do not change.
"""

from __future__ import annotations

import torch


def decay_mask(slopes_H: torch.Tensor, T: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """D[h, t, j] = exp(-s_h (t - j)) for j <= t, else 0. Shape [H, T, T].

    The exponent is masked with -inf before exp so that the upper triangle never forms
    exp(+big) under strong decay.
    """
    idx = torch.arange(T, device=slopes_H.device, dtype=dtype)
    dist_TT = idx[:, None] - idx[None, :]
    expo_HTT = -slopes_H.to(dtype)[:, None, None] * dist_TT
    expo_HTT = expo_HTT.masked_fill(dist_TT < 0, float("-inf"))
    return torch.exp(expo_HTT)


def running_log_decay(slopes_H: torch.Tensor, g_BHT: torch.Tensor, dtype) -> torch.Tensor:
    """G_t = sum_{j <= t} (g_j - s_h), [B, H, T] in ``dtype``: the log of the decay a state
    collects from the row's start through token t."""
    return (g_BHT.to(dtype) - slopes_H.to(dtype)[None, :, None]).cumsum(-1)


def token_decay_mask(G_BHT: torch.Tensor) -> torch.Tensor:
    """D[b, h, t, j] = exp(G_t - G_j) for j <= t, else 0 (exponent masked before exp)."""
    T = G_BHT.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=G_BHT.device).tril()
    expo = (G_BHT[..., :, None] - G_BHT[..., None, :]).masked_fill(~causal, float("-inf"))
    return torch.exp(expo)


def lightning_attention_naive(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHDE: torch.Tensor | None = None,
    return_state: bool = False,
    g_BHT: torch.Tensor | None = None,
):
    """Quadratic form, in float32 (float64 if given). Returns o, or (o, final_state)."""
    dtype = torch.promote_types(q_BHTD.dtype, torch.float32)
    q, k, v = (x.to(dtype) for x in (q_BHTD, k_BHTD, v_BHTE))
    B, H, T, _ = q.shape
    if g_BHT is not None:
        return _naive_token_decay(
            q, k, v, running_log_decay(slopes_H, g_BHT, dtype), doc_ids_BT,
            initial_state_BHDE, return_state, q_BHTD.dtype,
        )
    D_HTT = decay_mask(slopes_H, T, dtype)[None]
    if doc_ids_BT is not None:
        same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
        D_HTT = D_HTT * same_BTT[:, None].to(dtype)
    scores = torch.einsum("bhtd,bhjd->bhtj", q, k) * D_HTT
    out = torch.einsum("bhtj,bhje->bhte", scores, v)
    lam_H = torch.exp(-slopes_H.to(dtype))
    t = torch.arange(T, device=q.device, dtype=dtype)
    if doc_ids_BT is not None:
        first_BT = (doc_ids_BT == doc_ids_BT[:, :1]).to(dtype)
        last_BT = (doc_ids_BT == doc_ids_BT[:, -1:]).to(dtype)
    else:
        first_BT = last_BT = torch.ones(B, T, dtype=dtype, device=q.device)
    if initial_state_BHDE is not None:
        S0 = initial_state_BHDE.to(dtype)
        q_decay = lam_H[:, None] ** (t + 1)  # [H, T]
        out = (
            out
            + torch.einsum("bhtd,bhde->bhte", q * q_decay[None, :, :, None], S0)
            * first_BT[:, None, :, None]
        )
    out = out.to(q_BHTD.dtype)
    if not return_state:
        return out
    k_decay = (lam_H[:, None] ** (T - 1 - t))[None] * last_BT[:, None]  # [B, H, T]
    state = torch.einsum("bhtd,bhte->bhde", k * k_decay[..., None], v)
    if initial_state_BHDE is not None:
        carried = (doc_ids_BT[:, 0] == doc_ids_BT[:, -1]) if doc_ids_BT is not None else None
        c = lam_H**T
        c = c[None, :] * (carried[:, None].to(dtype) if carried is not None else 1.0)
        state = state + c[..., None, None] * initial_state_BHDE.to(dtype)
    return out, state


def _naive_token_decay(q, k, v, G, doc_ids_BT, initial_state_BHDE, return_state, out_dtype):
    """The quadratic form with per-token decays (G as ``running_log_decay`` gives it)."""
    B, H, T, _ = q.shape
    dtype = q.dtype
    D_BHTT = token_decay_mask(G)
    if doc_ids_BT is not None:
        same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
        D_BHTT = D_BHTT * same_BTT[:, None].to(dtype)
        first_BT = (doc_ids_BT == doc_ids_BT[:, :1]).to(dtype)
        last_BT = (doc_ids_BT == doc_ids_BT[:, -1:]).to(dtype)
    else:
        first_BT = last_BT = torch.ones(B, T, dtype=dtype, device=q.device)
    out = torch.einsum("bhtj,bhje->bhte", torch.einsum("bhtd,bhjd->bhtj", q, k) * D_BHTT, v)
    if initial_state_BHDE is not None:
        q_decay = torch.exp(G) * first_BT[:, None]  # [B, H, T]
        S0 = initial_state_BHDE.to(dtype)
        out = out + torch.einsum("bhtd,bhde->bhte", q * q_decay[..., None], S0)
    out = out.to(out_dtype)
    if not return_state:
        return out
    k_decay = torch.exp(G[..., -1:] - G) * last_BT[:, None]
    state = torch.einsum("bhtd,bhte->bhde", k * k_decay[..., None], v)
    if initial_state_BHDE is not None:
        c = torch.exp(G[..., -1])  # [B, H]
        if doc_ids_BT is not None:
            c = c * (doc_ids_BT[:, 0] == doc_ids_BT[:, -1]).to(dtype)[:, None]
        state = state + c[..., None, None] * initial_state_BHDE.to(dtype)
    return out, state


def lightning_attention_recurrent(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHDE: torch.Tensor | None = None,
    return_state: bool = False,
    g_BHT: torch.Tensor | None = None,
):
    """The same operator as a token-by-token recurrence, S_t = a_t S_{t-1} + k_t^T v_t
    (a_t = exp(g_t - s_h), or lambda = exp(-s_h) without ``g``), with S reset to 0 where a new
    document starts. A second, independent reference."""
    dtype = torch.promote_types(q_BHTD.dtype, torch.float32)
    B, H, T, D = q_BHTD.shape
    E = v_BHTE.shape[-1]
    lam = torch.exp(-slopes_H.to(dtype))[None, :, None, None]
    if g_BHT is not None:
        lams = torch.exp(g_BHT.to(dtype) - slopes_H.to(dtype)[None, :, None]).unbind(-1)
    S = (
        initial_state_BHDE.to(dtype).clone()
        if initial_state_BHDE is not None
        else q_BHTD.new_zeros(B, H, D, E, dtype=dtype)
    )
    outs = []
    qs, ks, vs = (x.to(dtype).unbind(2) for x in (q_BHTD, k_BHTD, v_BHTE))
    for t in range(T):
        if doc_ids_BT is not None and t > 0:
            keep = (doc_ids_BT[:, t] == doc_ids_BT[:, t - 1]).to(dtype)[:, None, None, None]
            S = S * keep
        a = lams[t][..., None, None] if g_BHT is not None else lam
        S = a * S + ks[t][..., :, None] * vs[t][..., None, :]
        outs.append(torch.einsum("bhd,bhde->bhe", qs[t], S))
    out = torch.stack(outs, dim=2).to(q_BHTD.dtype)
    return (out, S) if return_state else out
