"""Queries that see a whole prefix of earlier keys and their own keys causally.

    o_i = softmax over keys [k_prev (all P of them), k_own[: i + 1]] of q_i . k / sqrt(D)

This is the piece of softmax attention a context-parallel rank computes for the document
that started on an earlier rank (LASP-2H, parallel/lasp2h.py): its queries are the rank's
first tokens, ``k_prev`` the document's keys held by earlier ranks. The mask is "causal,
aligned to the bottom right" of the [L, P + L] score matrix, which plain ``is_causal`` SDPA
(aligned top left) does not express. Backends:

* ``flash_cpu`` (CPU, values as wide as keys): torch's CPU flash operator, which also
  returns each row's log-sum-exp, called twice (the prefix unmasked, the own keys causal)
  and merged by log-sum-exp (``_PrefixCausal``); no mask, and the causal half of the own
  block skipped. The operator is private
  (``aten::_scaled_dot_product_flash_attention_for_cpu``): its signature is pinned by a
  canary in tests/kernels/test_attention_prefix.py.
* ``lower_right`` (CUDA): SDPA with ``torch.nn.attention.bias.causal_lower_right``, which
  torch dispatches to its CUDA flash kernel (fp16/bf16) or the memory-efficient kernel
  (fp32) with the bottom-right causal mask built in. On CPU the same call materialises the
  mask (the math path): correct, which is how the tests check it here, but slow.
* ``naive``: the dense boolean mask, the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

__all__ = ["prefix_causal_attention", "PREFIX_BACKENDS"]

PREFIX_BACKENDS = ("auto", "flash_cpu", "lower_right", "naive")

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixCausal(torch.autograd.Function):
    """One unmasked and one causal flash call, merged as softmax over the union of the keys.

    Backward: each part's flash backward is given the merged output and the merged
    log-sum-exp, so it recomputes the probabilities of the union (exp(s - lse)) and the
    union's rowsum(dO * O): the exact gradient of the whole, the way ring flash attention
    combines blocks."""

    @staticmethod
    def forward(ctx, q, k_prev, v_prev, k_own, v_own, scale):
        o1, l1 = _flash(q, k_prev, v_prev, 0.0, False, scale=scale)
        o2, l2 = _flash(q, k_own, v_own, 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        o = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k_prev, v_prev, k_own, v_own, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k_prev, v_prev, k_own, v_own, o, lse = ctx.saved_tensors
        do = do.contiguous()
        dq1, dkp, dvp = _flash_backward(do, q, k_prev, v_prev, o, lse, 0.0, False, scale=ctx.scale)
        dq2, dko, dvo = _flash_backward(do, q, k_own, v_own, o, lse, 0.0, True, scale=ctx.scale)
        return dq1 + dq2, dkp, dvp, dko, dvo, None


def prefix_causal_attention(
    q_BHLD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSE: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """q [B, H, L, D]; k [B, H, P + L, D] and v [B, H, P + L, E], the P prefix keys first
    (S = P + L >= L). Query i sees keys 0 .. P + i. Returns [B, H, L, E]."""
    if backend not in PREFIX_BACKENDS:
        raise ValueError(f"prefix_causal_attention: backend {backend!r} not in {PREFIX_BACKENDS}")
    L, S = q_BHLD.shape[2], k_BHSD.shape[2]
    if S < L or v_BHSE.shape[2] != S:
        raise ValueError(
            f"prefix_causal_attention: q {tuple(q_BHLD.shape)}, k {tuple(k_BHSD.shape)}, "
            f"v {tuple(v_BHSE.shape)}; expected k, v [B, H, P + L, *] with P >= 0"
        )
    same_width = v_BHSE.shape[-1] == q_BHLD.shape[-1]
    if backend == "auto":
        backend = "flash_cpu" if q_BHLD.device.type == "cpu" and same_width else "lower_right"
    if backend == "flash_cpu" and not (same_width and q_BHLD.device.type == "cpu"):
        raise ValueError(
            "prefix_causal_attention: backend 'flash_cpu' needs CPU tensors and values as wide "
            f"as the keys; got {q_BHLD.device.type}, q {tuple(q_BHLD.shape)}, "
            f"v {tuple(v_BHSE.shape)}"
        )
    if S == L:  # no prefix: plain causal attention
        return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSE, is_causal=True, scale=scale)
    if backend == "lower_right":
        return F.scaled_dot_product_attention(
            q_BHLD, k_BHSD, v_BHSE, attn_mask=causal_lower_right(L, S), scale=scale
        )
    if backend == "naive":
        i = torch.arange(L, device=q_BHLD.device)[:, None]
        j = torch.arange(S, device=q_BHLD.device)[None, :]
        return F.scaled_dot_product_attention(
            q_BHLD, k_BHSD, v_BHSE, attn_mask=j <= S - L + i, scale=scale
        )
    scale = q_BHLD.shape[-1] ** -0.5 if scale is None else scale
    k_prev, k_own = k_BHSD.split([S - L, L], 2)
    v_prev, v_own = v_BHSE.split([S - L, L], 2)
    return _PrefixCausal.apply(q_BHLD, k_prev, v_prev, k_own, v_own, scale)
