"""Mixture-of-Head attention, letter ``M``.

Heads are shared (every token uses them) or routed (each token picks ``moh.top_k`` of them).
Per token t, with S shared heads (SkyworkAI/MoH's released code, ``moh.gates: released``):
    alpha = 2 softmax(W_a x)                2-way: shared versus routed (absent without shared)
    g_shared = alpha_0 * S * softmax(W_s x)
    p = softmax(W_r x);  g_routed = alpha_1 * k * renorm(p * topk_mask(p))
    out = W_o concat_h(g_h * head_h)        a weighted sum of heads instead of a plain sum
so every active head's gate is 1 when the routers are uniform (MoH then equals multi-head
attention); ``moh.gates: paper`` drops the factors 2, S and k (the paper's formulas).
``moh.router: query_norm`` is MoH-LLaMA3's released router instead: no router weights, the
top-k routed heads by the L2 norm of the token's (pre-rotary) query, gates 1 on them and on
the shared heads, no balance loss (the released code computes every head and multiplies by
the 0/1 gate; plait skips the unselected ones, which is the same function). Without
shared heads the routed gates are k * renorm(...). The load-balance loss over the R routed
heads is the released one, R * sum_i f_i P_i (f_i: fraction of tokens that selected head i,
P_i: mean router probability): k for uniform routing, R when every token picks the same
heads. It is added to the LM loss times ``moh.balance_coef`` in training (``auxiliary()``,
see ``HybridLM``) and logged on its own.

Skipping: a routed head computes attention only for the queries that selected it (gathered,
attended against all keys with their original positions, scattered back); keys and values
are computed for every token, since any later query may select the head. On one rank,
shared heads run causal SDPA without a mask, and with packed documents everything runs
document by document (``_heads_by_document``), so no [T, T] mask is built.

Tensor parallelism: heads are split across ranks, but top-k needs all routed logits, so the
router (three small [hidden -> heads] matrices) is replicated and every rank routes all heads
itself, which equals gathering the logits without a collective. The gates then pass
``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward) before a
rank scales its own heads, so the router's gradient sums every rank's heads and stays
identical on all ranks. The query-norm router needs every head's query norm: each rank
computes its heads' norms and megatron's ``gather_from_tensor_model_parallel_region``
all-gathers them ([B, T, heads], no gradient: the gates are 0/1).

Sequence parallelism: keys and values are all-gathered (LASP-2H's scheme, whatever
``parallel.softmax_sp`` says) and the balance statistics are averaged over the
sequence-parallel ranks, so both equal the single-process values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)
from torch import nn

from plait.kernels.attention import causal_attention
from plait.kernels.docs import document_lengths
from plait.models.common.config import ModelConfig
from plait.models.common.family import Auxiliary
from plait.models.common.layers import HeadProjections, apply_rotary, rotary_cos_sin, wide
from plait.parallel import softmax
from plait.parallel.sequence import SequenceParallel


def route(
    x_BTC: torch.Tensor,
    w_routed: torch.Tensor,
    w_shared: torch.Tensor | None,
    w_mix: torch.Tensor | None,
    top_k: int,
    scaled: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gates [B, T, shared + routed], the routed top-k mask [B, T, routed], and the routed
        probabilities [B, T, routed] (for the balance loss). Computed in float32 (float64 for a
    float64 model). ``w_mix`` is
        None without shared heads; ``w_shared`` is None with fewer than two."""
    x = wide(x_BTC)
    p = F.softmax(x @ w_routed.to(x.dtype).t(), dim=-1)
    top = p.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
    routed = p * mask
    routed = routed / routed.sum(-1, keepdim=True)
    if w_mix is None:
        return routed * (top_k if scaled else 1), mask, p
    alpha = F.softmax(x @ w_mix.to(x.dtype).t(), dim=-1)
    if w_shared is None:  # one shared head: its softmax gate would be the constant 1
        shared = torch.ones_like(alpha[..., :1])
    else:
        shared = F.softmax(x @ w_shared.to(x.dtype).t(), dim=-1)
    if scaled:  # the released code's factors: every active head's gate is ~1 at init
        shared, routed, alpha = shared * shared.shape[-1], routed * top_k, alpha * 2
    gates = torch.cat([alpha[..., :1] * shared, alpha[..., 1:] * routed], dim=-1)
    return gates, mask, p


def route_by_query_norm(
    norms_BTH: torch.Tensor, shared: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoH-LLaMA3's router: gates [B, T, heads] (1 on the shared heads and on the top_k
    routed heads by query norm, 0 elsewhere) and the routed mask [B, T, routed]. The release
    ranks softmax(norms / std(norms)) over the routed heads, a monotone map of the norms, and
    keeps only the top-k indicator."""
    routed = norms_BTH[..., shared:]
    top = routed.topk(top_k, dim=-1).indices
    mask = torch.zeros_like(routed, dtype=torch.bool).scatter_(-1, top, True)
    ones = torch.ones_like(norms_BTH[..., :shared])
    return torch.cat([ones, mask.to(ones.dtype)], dim=-1), mask


def balance_loss(mask_BTR: torch.Tensor, p_BTR: torch.Tensor, sp: SequenceParallel | None = None):
    """R * sum_i f_i P_i over the R routed heads, f_i the fraction of tokens that selected head
    i and P_i its mean router probability (the released code's loss; f carries no gradient):
    k for uniform routing, R when every token picks the same k heads."""
    R = p_BTR.shape[-1]
    f = mask_BTR.float().mean((0, 1))
    P = p_BTR.mean((0, 1))
    if sp is not None:
        f, P = sp.mean(f), sp.mean(P)
    return R * (f.detach() * P).sum()


def _attend_selected(q_BTD, k_BSD, v_BSD, sel_BT, q_index_T, k_index_S, q_docs, k_docs, scale):
    """Attention of the selected queries only; zeros elsewhere. [B, T, D]."""
    B, T, D = q_BTD.shape
    counts = sel_BT.sum(1)
    n = int(counts.max())
    out = q_BTD.new_zeros(B, T, v_BSD.shape[-1])
    if n == 0:
        return out
    order = torch.argsort((~sel_BT).to(torch.int8), dim=1, stable=True)[:, :n]  # selected first
    valid = torch.arange(n, device=q_BTD.device)[None] < counts[:, None]  # [B, n]
    q = q_BTD.gather(1, order[..., None].expand(B, n, D))
    qpos = q_index_T[order]  # [B, n] global positions
    allowed = k_index_S[None, None, :] <= qpos[..., None]  # [B, n, S]
    if q_docs is not None:
        qd = q_docs.gather(1, order)
        allowed = allowed & (k_docs[:, None, :] == qd[..., None])
    allowed = allowed & valid[..., None]
    allowed[..., 0] |= ~valid  # padding rows attend somewhere (then dropped) instead of NaN
    o = F.scaled_dot_product_attention(
        q[:, None], k_BSD[:, None], v_BSD[:, None], attn_mask=allowed[:, None], scale=scale
    )[:, 0]
    o = o * valid[..., None]
    return out.scatter(1, order[..., None].expand(B, n, o.shape[-1]), o)


class MoHAttention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        d, o = cfg.head_dim, cfg.moh
        self.proj = HeadProjections(cfg, mp, cfg.num_heads, (d, d, d), d)
        self.shared, self.top_k = o.shared_heads, o.top_k
        self.routed = cfg.num_heads - o.shared_heads
        self.rope_theta = cfg.rope_theta
        self.sp = sp
        std = cfg.init_std
        h = cfg.hidden_size
        self.query_norm = o.router == "query_norm"
        learned = not self.query_norm
        # Replicated router: drawn whole on every rank in the same order, so identical.
        self.w_routed = nn.Parameter(torch.randn(self.routed, h) * std) if learned else None
        multi = self.shared > 1 and learned
        self.w_shared = nn.Parameter(torch.randn(self.shared, h) * std) if multi else None
        self.w_mix = nn.Parameter(torch.randn(2, h) * std) if self.shared and learned else None
        self.balance_coef = o.balance_coef
        self.scaled = o.gates == "released"
        self.aux_loss: torch.Tensor | None = None

    def auxiliary(self) -> list[Auxiliary]:
        """The balance loss of the last forward pass, added to the training loss times
        ``moh.balance_coef``."""
        if self.aux_loss is None:
            return []
        return [Auxiliary("moh_balance", self.aux_loss, self.balance_coef)]

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        h, s = cfg.hidden_size, cfg.moh.shared_heads
        if cfg.moh.router == "query_norm":
            return 4 * h * h
        return 4 * h * h + h * (cfg.num_heads - s) + (2 * h if s else 0) + (h * s if s > 1 else 0)

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        return {"model.num_heads": cfg.num_heads}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        q, k, v = self.proj.split(x_BTC)
        gates, mask = self._route(x_BTC, q, balance=True)
        cos, sin = rotary_cos_sin(positions_BT, q.shape[-1], self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.sp.world == 1 and doc_ids_BT is not None:
            return self.proj.merge(self._heads_by_document(q, k, v, gates, mask, doc_ids_BT))
        k_all, v_all, k_index, k_docs, q_index = softmax.gather_keys(self.sp, k, v, doc_ids_BT)
        o = self._heads(q, k_all, v_all, gates, mask, q_index, k_index, doc_ids_BT, k_docs)
        return self.proj.merge(o)

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (the letter contract in family.py). The state is the KV cache of this
        rank's heads, {"k", "v": [B, H_local, S, D]} (keys after rotary): routing depends only
        on the new token (its x or its query), and a routed head skips queries, never keys,
        so any later query may need any earlier key of any head. Prefill (no state) is
        ``forward``'s path; with a state the new queries sit at cache positions S - T .. S - 1
        and attend causally over the whole cache. No balance loss is recorded."""
        q, k, v = self.proj.split(x_BTC)
        gates, mask = self._route(x_BTC, q, balance=False)
        cos, sin = rotary_cos_sin(positions_BT, q.shape[-1], self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is None:
            k_all, v_all, k_index, _, q_index = softmax.gather_keys(self.sp, k, v)
            o = self._heads(q, k_all, v_all, gates, mask, q_index, k_index)
            return self.proj.merge(o), {"k": k_all, "v": v_all}
        k, v = torch.cat((state["k"], k), 2), torch.cat((state["v"], v), 2)
        T, S = q.shape[2], k.shape[2]
        k_index = torch.arange(S, device=q.device)
        o = self._heads(q, k, v, gates, mask, k_index[S - T :], k_index)
        return self.proj.merge(o), {"k": k, "v": v}

    def _route(self, x_BTC, q_BHTD, balance: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates [B, T, all heads] and the routed mask [B, T, routed]; with ``balance``
        (training's forward) also the balance loss of these tokens in ``aux_loss``."""
        if self.query_norm:
            norms = gather_from_tensor_model_parallel_region(
                q_BHTD.detach().float().norm(dim=-1).transpose(1, 2).contiguous()
            )  # [B, T, all heads]
            return route_by_query_norm(norms, self.shared, self.top_k)
        gates, mask, p = route(
            x_BTC, self.w_routed, self.w_shared, self.w_mix, self.top_k, self.scaled
        )
        if balance:
            self.aux_loss = balance_loss(mask, p, self.sp)
        return copy_to_tensor_model_parallel_region(gates), mask

    def _heads(self, q, k_all, v_all, gates, mask, q_index, k_index, docs=None, k_docs=None):
        """Each local head's gated attention [B, H_local, T, D]: shared heads for every query,
        routed heads for the queries that selected them (positions q_index [T] among keys at
        k_index [S])."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        T, S = q.shape[2], k_all.shape[2]
        whole = docs is None and T == S and bool((q_index == k_index).all())
        outs = []
        for j in range(self.proj.heads):
            head = self.proj.first_head + j
            g = gates[..., head].to(q.dtype)[..., None]
            if head < self.shared and whole:  # every query, every key: plain causal SDPA
                o = F.scaled_dot_product_attention(
                    q[:, j : j + 1], k_all[:, j : j + 1], v_all[:, j : j + 1], is_causal=True
                )[:, 0]
                outs.append(o * g)
                continue
            if head < self.shared:
                sel = torch.ones_like(mask[..., 0])
            else:
                sel = mask[..., head - self.shared]
            o = _attend_selected(
                q[:, j], k_all[:, j], v_all[:, j], sel, q_index, k_index, docs, k_docs, scale
            )
            outs.append(o * g)
        return torch.stack(outs, 1)

    def _heads_by_document(self, q, k, v, gates, mask, docs):
        """``_heads`` on one rank with packed documents, document by document, without a
        [T, T] mask: the shared heads by per-document causal SDPA (kernels/attention), each
        routed head's selected queries of a document against that document's keys only (a
        mask [selected, L_d] per document; sum_d L_d^2 entries rather than T^2)."""
        H, first = self.proj.heads, self.proj.first_head
        ls = min(max(self.shared - first, 0), H)  # local shared heads come first (contiguous)
        scale = 1.0 / math.sqrt(q.shape[-1])
        parts = []
        if ls:
            parts.append(causal_attention(q[:, :ls], k[:, :ls], v[:, :ls], doc_ids=docs))
        if ls < H:
            r0 = first + ls - self.shared
            sel = mask[..., r0 : r0 + H - ls].transpose(1, 2)  # [B, routed local, T]
            lengths = document_lengths(docs)
            rows = [
                _routed_by_document(qb, kb, vb, sb, lb, scale)
                for qb, kb, vb, sb, lb in zip(
                    q[:, ls:].unbind(0), k[:, ls:].unbind(0), v[:, ls:].unbind(0),
                    sel.unbind(0), lengths,
                )
            ]
            parts.append(torch.stack(rows))
        o = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        g = gates[..., first : first + H].transpose(1, 2).to(q.dtype)[..., None]
        return o * g


def _routed_by_document(q_HTD, k_HTD, v_HTD, sel_HT, lengths: list[int], scale):
    """One row's routed heads, document by document: within a document of L tokens the
    selected queries attend its keys causally (``_attend_selected`` with the heads as its
    batch). Cut with ``split`` and joined with ``cat`` (one gradient copy, see
    kernels/attention/segments.py). [H, T, D]."""
    outs = []
    for q, k, v, sel in zip(
        q_HTD.split(lengths, 1), k_HTD.split(lengths, 1), v_HTD.split(lengths, 1),
        sel_HT.split(lengths, 1),
    ):
        idx = torch.arange(q.shape[1], device=q.device)
        outs.append(_attend_selected(q, k, v, sel, idx, idx, None, None, scale))
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0]
