"""MoH: reduction to multi-head attention (released gate factors) or scaled heads (the
paper's), the balance loss's minimum,
selected-query attention against a dense reference, and that unselected heads are skipped."""

import pytest
import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig

import plait.models.moh.mixer as moh_mixer
from plait.models.common import ModelConfig
from plait.models.common.layers import apply_rotary, rotary_cos_sin
from plait.models.moh.mixer import MoHAttention, _attend_selected, balance_loss, route
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

T, H, D = 29, 6, 8


def _layer(
    shared: int, top_k: int, gates: str = "released", router: str = "learned"
) -> MoHAttention:
    cfg = ModelConfig(pattern="M", num_layers=1, hidden_size=H * D, num_heads=H)
    cfg.moh.shared_heads, cfg.moh.top_k, cfg.moh.gates = shared, top_k, gates
    cfg.moh.router = router
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    return MoHAttention(cfg, mp, 0, SequenceParallel())


def _mha_scaled(m: MoHAttention, x, scales):
    """Plain causal multi-head attention, head h's output times scales[h]."""
    q, k, v = m.proj.split(x)
    cos, sin = rotary_cos_sin(torch.arange(T).expand(2, T), D, m.rope_theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return m.proj.merge(o * scales.view(1, H, 1, 1))


def _reduction(rt, shared, seed, gates):
    torch.manual_seed(seed)
    m = _layer(shared, H - shared, gates)  # top-k = every routed head
    with torch.no_grad():  # uniform gates
        for p in (m.w_routed, m.w_shared, m.w_mix):
            if p is not None:
                p.zero_()
    x = torch.randn(2, T, H * D)
    routed = H - shared
    if gates == "released":  # 2 * 1/2 * S * 1/S = 2 * 1/2 * k * 1/k = 1: plain MHA
        scales = torch.ones(H)
    elif shared:
        scales = torch.tensor([0.5 / shared] * shared + [0.5 / routed] * routed)
    else:
        scales = torch.full((H,), 1.0 / routed)
    pos = torch.arange(T).expand(2, T)
    outs = []
    for fn in (lambda xi: m(xi, pos), lambda xi: _mha_scaled(m, xi, scales)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad.clone(), m.proj.in_proj.weight.grad.clone()))
    return outs


@pytest.mark.parametrize("shared", [0, 1, 2])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gates", ["released", "paper"])
def test_all_heads_uniform_gates_is_scaled_multi_head_attention(shared, seed, gates):
    """Released gates: uniform routers give plain multi-head attention (every head's gate 1);
    the paper's: heads scaled by 1/2 * 1/S (shared) and 1/2 * 1/R (routed)."""
    fast, ref = run_distributed(_reduction, 1, shared, seed, gates)[0]
    for a, b, what in zip(fast, ref, ("output", "dx", "d in_proj"), strict=True):
        assert_rel_close(a, b, 1e-5, what)


def test_balance_loss_is_minimal_for_uniform_routing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 32, generator=g)
    for R, k in ((4, 1), (6, 2), (8, 3)):
        _, mask, p = route(x, torch.zeros(R, 32), None, None, k)
        uniform = balance_loss(mask, p).item()
        assert abs(uniform - k) < 1e-6  # the released loss: R * sum f_i P_i = R * R (k/R)(1/R)
        for scale in (0.1, 1.0, 10.0):
            w = torch.randn(R, 32, generator=g) * scale
            _, mask, p = route(x, w, None, None, k)
            assert balance_loss(mask, p).item() > uniform
        # every token sends its top-k to the same heads: the worst case, R
        skew = torch.zeros(R, 32)
        skew[:k, 0] = 100.0
        _, mask, p = route(x.abs(), skew, None, None, k)
        worst = balance_loss(mask, p).item()
        assert 0.95 * R < worst <= R + 1e-6


def _dense_selected(q, k, v, sel, docs, scale):
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None]
    if docs is not None:
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
    o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                       attn_mask=allowed[:, None], scale=scale)[:, 0]
    return o * sel[..., None]


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("frac", [0.0, 0.3, 1.0])
def test_attend_selected_matches_dense(docs, frac):
    g = torch.Generator().manual_seed(int(frac * 10) + docs)
    q, k, v = (torch.randn(2, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    sel = torch.rand(2, T, generator=g) < frac
    doc_ids = (torch.arange(T) >= 11).long().expand(2, T).clone() if docs else None
    idx = torch.arange(T)
    got = _attend_selected(q, k, v, sel, idx, idx, doc_ids, doc_ids, D**-0.5)
    want = _dense_selected(q, k, v, sel, doc_ids, D**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _count_queries(rt):
    torch.manual_seed(0)
    m = _layer(2, 1)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append(q.shape[-2])
        return real(q, *a, **kw)

    moh_mixer.F.scaled_dot_product_attention = spy
    try:
        x = torch.randn(2, T, H * D)
        m(x, torch.arange(T).expand(2, T))
    finally:
        moh_mixer.F.scaled_dot_product_attention = real
    _, mask, _ = route(x, m.w_routed, m.w_shared, m.w_mix, 1)
    return seen, mask.sum(1).max(0).values.tolist()


def test_unselected_heads_are_skipped():
    """Shared heads attend with all T queries; a routed head with only the queries that picked
    it (the most any sequence of the batch gave it), not T queries masked afterwards."""
    seen, per_head = run_distributed(_count_queries, 1)[0]
    assert seen[:2] == [T, T]
    assert seen[2:] == [n for n in per_head if n > 0]
    assert sum(per_head) < 2 * T  # top-1 of 4 routed heads: far fewer than 4 T query rows


def _query_norm(rt, shared, top_k, seed):
    torch.manual_seed(seed)
    m = _layer(shared, top_k, router="query_norm")
    x = torch.randn(2, T, H * D)
    pos = torch.arange(T).expand(2, T)
    q = m.proj.split(x)[0].detach()  # [B, H, T, D], before rotary
    # MoH-LLaMA3: softmax(||q_h|| / std) over the routed heads, top-k, one-hot; shared: 1.
    score = q.norm(dim=-1)[:, shared:]  # [B, R, T]
    score = (score / score.std(dim=1, keepdim=True)).softmax(dim=1)
    top = score.topk(top_k, dim=1).indices
    gate = torch.zeros_like(score).scatter_(1, top, 1.0)
    gate = torch.cat([torch.ones_like(q[:, :shared, :, 0]), gate], 1)  # [B, H, T]
    outs = []
    for fn in (lambda xi: m(xi, pos), lambda xi: _mha_gated(m, xi, gate)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad.clone(), m.proj.in_proj.weight.grad.clone()))
    names = [n for n, _ in m.named_parameters()]
    return outs, names, m.auxiliary()


def _mha_gated(m: MoHAttention, x, gate_BHT):
    """The release's form: every head computed, its output times the 0/1 gate."""
    q, k, v = m.proj.split(x)
    cos, sin = rotary_cos_sin(torch.arange(T).expand(2, T), D, m.rope_theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return m.proj.merge(o * gate_BHT[..., None])


@pytest.mark.parametrize("shared,top_k", [(3, 1), (2, 2), (0, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_query_norm_router_is_moh_llama3(shared, top_k, seed):
    """moh.router: query_norm equals all heads computed and multiplied by MoH-LLaMA3's 0/1
    gates (top-k routed heads by softmax(||q|| / std)); no router parameters, no balance
    loss."""
    (fast, ref), names, aux = run_distributed(_query_norm, 1, shared, top_k, seed)[0]
    for a, b, what in zip(fast, ref, ("output", "dx", "d in_proj"), strict=True):
        assert_rel_close(a, b, 1e-5, what)
    assert all(n.startswith("proj.") for n in names) and aux == []


# Packed documents on one rank (_heads_by_document) against the dense-mask path it replaced
# (_heads with the [T, T] causal and same-document mask): rows with different boundaries,
# uneven documents, length-1 documents (first, middle, last).
DOC_ROWS = [[11, 1, 12, 5], [1, 1, 25, 1, 1]]


def _doc_ids_and_positions():
    ids, pos, first = [], [], 0
    for lengths in DOC_ROWS:
        n = torch.tensor(lengths)
        ids.append(torch.repeat_interleave(torch.arange(len(lengths)) + first, n))
        pos.append(torch.cat([torch.arange(L) for L in lengths]))
        first += len(lengths)
    return torch.stack(ids), torch.stack(pos)


def _dense_forward(m: MoHAttention, x, pos, docs):
    """forward's single-rank path before documents were cut: every head through
    _attend_selected with the dense [T, T] causal, same-document mask."""
    q, k, v = m.proj.split(x)
    gates, mask = m._route(x, q, balance=False)
    cos, sin = rotary_cos_sin(pos, D, m.rope_theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    idx = torch.arange(T)
    return m.proj.merge(m._heads(q, k, v, gates, mask, idx, idx, docs, docs))


def _by_document(rt, shared, top_k, seed, router):
    torch.manual_seed(seed)
    m = _layer(shared, top_k, router=router)
    ref_m = _layer(shared, top_k, router=router).double()
    ref_m.load_state_dict(m.state_dict())
    docs, pos = _doc_ids_and_positions()
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(2, T, H * D, generator=g)
    dy = torch.randn(2, T, H * D, generator=g)
    runs = (
        (m, lambda xi: m(xi, pos, docs), torch.float32),
        (ref_m, lambda xi: _dense_forward(ref_m, xi, pos, docs), torch.float64),
    )
    outs = []
    for mod, fn, dtype in runs:
        xi = x.to(dtype).clone().requires_grad_()
        y = fn(xi)
        (y * dy.to(dtype)).sum().backward()
        grads = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
        outs.append((y.detach(), xi.grad.clone(), grads))
    return outs


@pytest.mark.parametrize("shared,top_k", [(2, 2), (0, 3), (3, 1), (5, 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("router", ["learned", "query_norm"])
def test_documents_by_document_equal_the_dense_mask(shared, top_k, seed, router):
    """fp32 per-document path against the float64 dense-mask path: output, dx and every
    parameter's gradient (the routers' included)."""
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = run_distributed(
        _by_document, 1, shared, top_k, seed, router
    )[0]
    assert_rel_close(y, y_ref, 1e-5, "output")
    assert_rel_close(dx, dx_ref, 1e-5, "dx")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert_rel_close(grads[name], grads_ref[name], 1e-5, f"d {name}")


def _local_heads(rt, first, heads, shared):
    """One TP rank's slice of the heads (first, heads), as HeadProjections hands it over:
    _heads_by_document and the dense _heads see the same local tensors."""
    torch.manual_seed(0)
    m = _layer(shared, max(1, (H - shared) // 2)).double()
    m.proj.first_head, m.proj.heads = first, heads
    docs, _ = _doc_ids_and_positions()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    x = torch.randn(2, T, H * D, generator=g, dtype=torch.float64)
    gates, mask, _ = route(x, m.w_routed, m.w_shared, m.w_mix, m.top_k)
    idx = torch.arange(T)
    got = m._heads_by_document(q, k, v, gates, mask, docs)
    want = m._heads(q, k, v, gates, mask, idx, idx, docs, docs)
    return got, want


@pytest.mark.parametrize("first,heads", [(0, 3), (3, 3), (2, 2)])
@pytest.mark.parametrize("shared", [2, 4])
def test_documents_by_document_on_a_tensor_parallel_slice(first, heads, shared):
    got, want = run_distributed(_local_heads, 1, first, heads, shared)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _count_queries_by_document(rt):
    torch.manual_seed(0)
    m = _layer(2, 1)
    docs, pos = _doc_ids_and_positions()
    x = torch.randn(2, T, H * D)
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, *a, **kw):
        seen.append((q.shape[-2], kw.get("attn_mask") is not None))
        return real(q, *a, **kw)

    moh_mixer.F.scaled_dot_product_attention = spy
    try:
        m(x, pos, docs)
    finally:
        moh_mixer.F.scaled_dot_product_attention = real
    _, mask, _ = route(x, m.w_routed, m.w_shared, m.w_mix, 1)  # [B, T, routed]
    want = []
    for row, lengths in enumerate(DOC_ROWS):  # per document, the most any routed head got
        for sel in mask[row].split(lengths):
            want.append(int(sel.sum(0).max()))
    return seen, [n for n in want if n > 0]


def test_documents_routed_heads_skip_unselected_queries():
    """With documents, shared heads run one maskless causal call per document; routed heads
    one masked call per document with only the queries some head selected there."""
    seen, want = run_distributed(_count_queries_by_document, 1)[0]
    shared = [n for n, masked in seen if not masked]
    routed = [n for n, masked in seen if masked]
    assert shared == [n for lengths in DOC_ROWS for n in lengths]
    assert routed == want
    assert sum(routed) < 2 * T  # top-1 of 4 routed heads
