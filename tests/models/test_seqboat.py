"""SeqBoat's layer against the released layer's function, written here from its formulas
(renll/SeqBoat's SeqBoatUnit, causal, local, rotary, softmax; docs/fidelity/seqboat.md) on
the tensors in the released layout (plait's HF export, so the export is checked with it):
the EMA as a direct causal sum with the kernel cut at the truncation, the router from
hx_proj's first two rows, the active tokens compressed row by row, [z | r | v] =
SiLU(mx_proj(mx)), interleaved rotary on the original positions, a dense [n, n] mask with
the exact band i - window < j <= i, biases everywhere. Where plait deliberately differs
(residual outside the layer, per-row compression, document resets, no dropout) the reference
follows plait. Also: the band's width, the truncated EMA kernel, sequence parallelism with
short and long kernels, the released inits and the rotary permutation of the export.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig

from plait.models.common import ModelConfig
from plait.models.common.config import ModelConfigError
from plait.models.common.layers import apply_rotary, rotary_cos_sin
from plait.models.seqboat.config import SeqBoatOptions
from plait.models.seqboat.hf_export import EXPORTS, interleave
from plait.models.seqboat.mixer import MultiHeadEMA, SeqBoat, local_attention
from plait.parallel.config import ParallelConfig
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

T, D, Z, N = 37, 32, 8, 4  # T: not a multiple of any window below
ATTENTION = ("w_z", "b_z", "qk_gamma", "qk_beta", "w_v.weight", "w_v.bias", "w_r.weight",
             "w_r.bias", "w_h.weight", "w_h.bias")
TN_STD = 0.8796  # std of a unit normal cut at +-2


def _restart(d):
    out = torch.zeros_like(d)
    for t in range(1, len(d)):
        out[t] = 0 if d[t] != d[t - 1] else out[t - 1] + 1
    return out


def _inputs(seed, docs: bool, length: int = T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, length, D, generator=g)
    doc_ids = torch.zeros(2, length, dtype=torch.long)
    if docs:
        doc_ids[0, 15:] = 1
        doc_ids[1, 8:] = 1
        doc_ids[1, 30:] = 2
    pos = torch.stack([_restart(doc_ids[b]) for b in range(2)])
    return x, pos, (doc_ids if docs else None)


def _cfg(router="learned", window=5, truncation=0, bias=True) -> ModelConfig:
    cfg = ModelConfig(pattern="S", num_layers=1, hidden_size=D, num_heads=1)
    cfg.options["seqboat"] = SeqBoatOptions(
        ema_dim=N, zdim=Z, window=window, ema_truncation=truncation, bias=bias, router=router
    )
    return cfg


def _layer(cfg: ModelConfig, sp: SequenceParallel | None = None) -> SeqBoat:
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    return SeqBoat(cfg, mp, 0, sp or SequenceParallel())


def _randomise(m: SeqBoat, seed: int) -> None:
    """Trained-looking weights: biases, a q/k affine far from the near-uniform init, a router
    that sends about half the tokens to the GAU. Drawn from a seeded generator, so every
    rank of a parallel run gets the same."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name == "log_tau":
                p.copy_(torch.tensor([math.log(0.7)]))
            elif name == "w_router":
                p.copy_(r)
            elif name.startswith("ema.") or name == "qk_gamma":
                p.copy_(r)
            elif name.startswith("b_") or name.endswith(".bias") or name == "qk_beta":
                p.copy_(0.3 * r)
            else:  # projection weights
                p.copy_(r / math.sqrt(p.shape[1]))


# The released layer, from its formulas, on the tensors of its own layout.


def rope_interleaved(x, pos, theta):
    """Rotary as released: channel pairs (2i, 2i+1) as one complex number, times
    exp(1j * pos * theta^(-2i/Z))."""
    Zx, dt = x.shape[-1], torch.promote_types(x.dtype, torch.float32)
    freq = 1.0 / (theta ** (torch.arange(0, Zx, 2, dtype=dt) / Zx))
    rot = torch.polar(torch.ones(len(pos), Zx // 2, dtype=dt), pos.to(dt)[:, None] * freq)
    xc = torch.view_as_complex(x.to(dt).reshape(*x.shape[:-1], Zx // 2, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2)


def ema_reference(P, x, docs, truncation):
    """y[t] = sum_{t - L < j <= t, same document} k[t - j] x[j] + omega x[t], with
    k[d, l] = sum_n gamma sqrt(1/N) p beta (1 - p alpha)^l, L = min(truncation, T) or T."""
    B, Tx, _ = x.shape
    L = min(truncation, Tx) if truncation else Tx
    p = torch.sigmoid(P["move.delta"])  # [D, N, 1]
    q = 1 - p * torch.sigmoid(P["move.alpha"])
    lags = torch.arange(Tx, dtype=x.dtype)
    kern = torch.einsum("dnl,dn->dl", p * P["move.beta"] * q**lags, P["move.gamma"])
    kern = kern * math.sqrt(1.0 / P["move.gamma"].shape[1])  # [D, T]
    lag = torch.arange(Tx)[:, None] - torch.arange(Tx)[None, :]
    keep = ((lag >= 0) & (lag < L)).to(x.dtype)  # [T, T]
    toeplitz = kern[:, lag.clamp(min=0)] * keep  # [D, t, j]
    if docs is None:
        y = torch.einsum("dtj,bjd->btd", toeplitz, x)
    else:
        same = (docs[:, :, None] == docs[:, None, :]).to(x.dtype)
        y = torch.einsum("dtj,btj,bjd->btd", toeplitz, same, x)
    return y + x * P["move.omega"]


def released(P, x, pos, docs, cfg):
    o, h = cfg.seqboat, cfg.hidden_size
    hdim = o.value_dim(h)
    bias = (lambda n: P[n]) if o.bias else (lambda n: None)
    mx = F.silu(ema_reference(P, x, docs, o.ema_truncation))
    u, hx = F.linear(mx, P["hx_proj.weight"], bias("hx_proj.bias")).split([2, h], -1)
    if o.router == "learned":
        prob = torch.softmax(u / P["q_router.temp"].exp(), -1)
        active = prob[..., 1] > prob[..., 0]
        gate = prob[..., 1] * active
    else:
        active = torch.full(u.shape[:2], o.router == "on")
        gate = active.to(u.dtype)
    rows = []
    for b in range(x.shape[0]):
        idx = torch.nonzero(active[b]).flatten()
        n = len(idx)
        row = x.new_zeros(x.shape[1], h)
        if n:
            base = F.silu(F.linear(mx[b, idx], P["mx_proj.weight"], bias("mx_proj.bias")))
            z, r, v = base.split([o.zdim, hdim, hdim], -1)
            qk = z[:, None, :] * P["gamma"] + P["beta"]
            q = rope_interleaved(qk[:, 0], pos[b, idx], cfg.rope_theta)
            k = rope_interleaved(qk[:, 1], pos[b, idx], cfg.rope_theta)
            i = torch.arange(n)
            band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - o.window)
            if docs is not None:
                band &= docs[b, idx][None, :] == docs[b, idx][:, None]
            scores = (q * o.zdim**-0.5) @ k.t()
            a = torch.softmax(scores.masked_fill(~band, float("-inf")), -1) @ v
            hh = F.linear(a * r, P["h_proj.weight"], bias("h_proj.bias"))
            row = row.index_add(0, idx, hh * gate[b, idx, None])
        rows.append(row)
    return F.silu(hx + torch.stack(rows))


def _released_of(m: SeqBoat, cfg):
    def fn(x, pos, docs):
        P = EXPORTS["S"].to_hf(dict(m.named_parameters()), cfg, 0)
        return released(P, x, pos, docs, cfg)

    return fn


def _fwd_bwd(m, fn, x, pos, docs):
    m.zero_grad()
    xi = x.clone().requires_grad_()
    y = fn(xi, pos, docs)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in m.named_parameters()}
    return y.detach(), xi.grad.clone(), grads


def _compare(rt, cfg, seed, docs):
    m = _layer(cfg)
    _randomise(m, seed)
    x, pos, doc_ids = _inputs(seed, docs)
    fast = _fwd_bwd(m, m, x, pos, doc_ids)
    ref = _fwd_bwd(m, _released_of(m, cfg), x, pos, doc_ids)
    mask, _ = m.gates(F.silu(m.ema(x, doc_ids, SequenceParallel())))
    return fast, ref, mask.float().mean().item()


LOG_TAU_TOL = 1e-4
"""log_tau's gradient is one scalar summed over every active token's gate with both signs:
float32 rounding leaves ~5e-5 of it in either path (measured against float64: plait 4.9e-5
and 6.7e-6, the reference 7.9e-6 and 4.5e-5 in the two cases that reach it)."""

CASES = [  # (seed, window, ema_truncation, bias): windows 1..8, kernels cut or whole
    (0, 5, 11, True),
    (1, 8, 0, True),
    (2, 3, 20, False),
    (3, 1, 6, True),
]


@pytest.mark.parametrize("router", ["on", "learned"])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("seed,window,truncation,bias", CASES)
def test_matches_released_formulas(router, docs, seed, window, truncation, bias):
    """Outputs, input and parameter gradients equal the released function's (rel 1e-5),
    with random weights and biases: all tokens active, or the learned router's half."""
    cfg = _cfg(router, window, truncation, bias)
    fast, ref, active = run_distributed(_compare, 1, cfg, seed, docs)[0]
    if router == "learned":
        assert 0.2 < active < 0.8, f"router sent {active:.2f} of tokens: test would be weak"
    else:
        assert active == 1.0
    assert_rel_close(fast[0], ref[0], 1e-5, "output")
    assert_rel_close(fast[1], ref[1], 1e-5, "dx")
    for k, g in ref[2].items():
        assert_rel_close(fast[2][k], g, LOG_TAU_TOL if k == "log_tau" else 1e-5, k)


# The window: exactly `window` keys, itself included.


@pytest.mark.parametrize("window", [1, 3, 5, 8, 40])
def test_window_sees_exactly_window_keys(window):
    """With v = identity the output rows are the attention weights: query i gives weight to
    keys i - window + 1 .. i and to no other (23 queries: several chunks, a partial last)."""
    n = 23
    g = torch.Generator().manual_seed(window)
    q, k = torch.randn(2, 1, n, 4, generator=g).unbind(0)
    v = torch.eye(n)[None]
    valid = torch.ones(1, n, dtype=torch.bool)
    weights = local_attention(q, k, v, None, valid, window, 0.5)[0]
    i = torch.arange(n)
    band = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
    assert torch.equal(weights > 0, band)
    assert torch.equal((weights > 0).sum(-1), (i + 1).clamp(max=window))
    torch.testing.assert_close(weights.sum(-1), torch.ones(n))


def _reach(rt, window, query):
    """|d out[query] / d x[j]| per position j, the EMA made pointwise (no taps, omega 1) so
    that only attention carries information between tokens; every token active."""
    cfg = _cfg("on", window)
    m = _layer(cfg)
    _randomise(m, 0)
    with torch.no_grad():
        m.ema.gamma.zero_()
        m.ema.omega.fill_(1.0)
    x, pos, _ = _inputs(0, False)
    x = x[:1].clone().requires_grad_()
    m(x, pos[:1])[0, query].sum().backward()
    return x.grad[0].abs().sum(-1)


@pytest.mark.parametrize("window,query", [(5, 36), (5, 12), (8, 20), (1, 30)])
def test_a_key_window_minus_one_back_reaches_the_output_and_one_further_does_not(window, query):
    reach = run_distributed(_reach, 1, window, query)[0]
    seen = torch.nonzero(reach).flatten().tolist()
    assert seen == list(range(query - window + 1, query + 1)), seen


# The EMA truncation.


def test_ema_kernel_is_cut_at_the_truncation():
    """An impulse at t = 0 (omega 0) returns the kernel: the closed form for t < truncation,
    zero beyond (up to the FFT's rounding); without truncation every tap is there."""
    torch.manual_seed(0)
    length, cut = 30, 7
    for truncation, taps in ((cut, cut), (0, length), (100, length)):
        ema = MultiHeadEMA(3, N, truncation)
        assert ema.kernel_length(length) == taps
        with torch.no_grad():
            ema.omega.zero_()
            ema.alpha.fill_(-3.0)  # slow decay (~0.98 a step): the last taps are not tiny
        x = torch.zeros(1, length, 3)
        x[0, 0] = 1.0
        y = ema(x, None, SequenceParallel())[0].t()  # [C, T]
        p = torch.sigmoid(ema.delta)
        decay = 1 - p * torch.sigmoid(ema.alpha)
        lags = torch.arange(length).float()
        closed = torch.einsum("cn,cnl->cl", ema.gamma * p * ema.beta, decay[..., None] ** lags)
        closed = closed / math.sqrt(N)
        assert_rel_close(y[:, :taps], closed[:, :taps].detach(), 1e-5, f"taps ({truncation})")
        if taps < length:
            assert y[:, taps:].abs().max() < 1e-6 * y.abs().max()
        assert closed[:, taps - 1].abs().min() > 1e-4  # the last kept tap is not negligible


def _sp_run(rt, cfg, seed):
    """The mixer on this rank's chunk (CP = world; the whole sequence at world 1): output,
    dx and parameter gradients (this rank's share of the whole loss's gradient)."""
    sp = SequenceParallel.from_parallel_state()
    m = _layer(cfg, sp)
    _randomise(m, seed)
    x, pos, docs = _inputs(seed, True, 36)
    sl = sp.local_index(36)
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)[:, sl]  # the global loss, sliced
    xi = x[:, sl].clone().requires_grad_()
    y = m(xi, pos[:, sl], docs[:, sl])
    (y * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return y.detach(), xi.grad.clone(), grads


@pytest.mark.parametrize(
    "truncation,window",
    [(5, 4), (30, 4), (0, 7), (1, 3)],  # halo (kernel <= 18 tokens per rank), prefix, whole
)
def test_sequence_parallel_equals_single_process(truncation, window):
    """CP = 2 (18 tokens per rank, documents across the border): the truncated EMA by halo
    (5 taps), by gathered prefix (30 taps > 18), untruncated, and the compressed windows
    crossing the border; output, dx and the summed parameter gradients."""
    cfg = _cfg("learned", window, truncation)
    one = run_distributed(_sp_run, 1, cfg, 4)[0]
    two = run_distributed(_sp_run, 2, cfg, 4, parallel=ParallelConfig(context_parallel=2))
    y = torch.cat([r[0] for r in two], 1)
    dx = torch.cat([r[1] for r in two], 1)
    assert_rel_close(y, one[0], 1e-5, "output")
    assert_rel_close(dx, one[1], 1e-5, "dx")
    for k, g in one[2].items():
        assert_rel_close(two[0][2][k] + two[1][2][k], g, 1e-5, k)


# The released inits.


def test_inits_are_the_released_ones():
    """Weights TN(0, init_std) cut at +-2 std, W_h included (no depth scaling, even at 24
    layers); gamma the same (centred on 0, not 1), beta and every bias 0; log_tau =
    log(scale * sqrt(hidden)); the EMA's truncated normals around Mega's values."""
    cfg = ModelConfig(pattern="S" * 24, num_layers=24, hidden_size=256, num_heads=1)
    cfg.seqboat.zdim = 64
    m = run_distributed(_state, 1, cfg, None)[0]
    std = cfg.init_std
    for name in ("w_router", "w_z", "qk_gamma", "w_v.weight", "w_r.weight", "w_hx.weight",
                 "w_h.weight"):
        w = m[name]
        assert w.abs().max() <= 2 * std, name
        if w.numel() > 5000:
            assert abs(w.std().item() / (std * TN_STD) - 1) < 0.05, (name, w.std().item())
            assert abs(w.mean().item()) < 5 * std / math.sqrt(w.numel()), name
    assert abs(m["qk_gamma"].mean().item()) < 0.01  # centred on 0, not on 1
    for name in ("b_router", "b_z", "qk_beta", "w_v.bias", "w_r.bias", "w_hx.bias", "w_h.bias"):
        assert torch.count_nonzero(m[name]) == 0, name
    torch.testing.assert_close(m["log_tau"], torch.tensor([math.log(0.3 * 16.0)]))
    cfg.seqboat.router_temperature = 1.0
    hot = run_distributed(_state, 1, cfg, None)[0]
    torch.testing.assert_close(hot["log_tau"], torch.tensor([math.log(16.0)]))
    for name, s in (("delta", 0.2), ("alpha", 0.2), ("gamma", 1.0), ("omega", 1.0)):
        w = m[f"ema.{name}"]
        assert w.abs().max() <= 2 * s and abs(w.std().item() / (s * TN_STD) - 1) < 0.1, name
    sign = torch.tensor([1.0, -1.0] * (cfg.seqboat.ema_dim // 2))
    noise = m["ema.beta"] - sign
    assert noise.abs().max() <= 0.04 and abs(noise.std().item() / (0.02 * TN_STD) - 1) < 0.1


# The export: the released layout, exactly invertible.


def _state(rt, cfg, seed):
    m = _layer(cfg)
    if seed is not None:
        _randomise(m, seed)
    return {k: v.detach() for k, v in m.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
def test_export_is_the_released_layout_and_inverts(bias):
    cfg = _cfg(bias=bias)
    s = run_distributed(_state, 1, cfg, 0)[0]
    hf = EXPORTS["S"].to_hf(s, cfg, 0)
    H = cfg.seqboat.value_dim(D)
    names = {f"move.{p}" for p in ("delta", "alpha", "beta", "gamma", "omega")}
    names |= {"mx_proj.weight", "hx_proj.weight", "h_proj.weight", "gamma", "beta"}
    names |= {"q_router.temp"}
    if bias:
        names |= {"mx_proj.bias", "hx_proj.bias", "h_proj.bias"}
    assert set(hf) == names
    assert hf["move.delta"].shape == (D, N, 1) and hf["move.gamma"].shape == (D, N)
    assert hf["hx_proj.weight"].shape == (2 + D, D)
    z, r, v = hf["mx_proj.weight"].split([Z, H, H])  # the released [z | r | v] split
    assert torch.equal(z, s["w_z"][interleave(Z)])
    assert torch.equal(r, s["w_r.weight"]) and torch.equal(v, s["w_v.weight"])
    assert torch.equal(hf["hx_proj.weight"][:2], s["w_router"])  # router rows first
    assert torch.equal(hf["gamma"], s["qk_gamma"][:, interleave(Z)])
    if bias:
        assert torch.equal(hf["hx_proj.bias"][2:], s["w_hx.bias"])
        assert torch.equal(hf["mx_proj.bias"][:Z], s["b_z"][interleave(Z)])
    back = EXPORTS["S"].from_hf(hf, cfg, 0)
    assert back.keys() == s.keys()
    for k, t in s.items():
        assert torch.equal(back[k], t), k


def test_half_rotation_is_the_interleaved_rotation_of_permuted_channels():
    """plait's rotate-half RoPE then the export's permutation == the permutation then the
    released interleaved (complex-pair) RoPE; so q.k, hence the attention, is the same."""
    g = torch.Generator().manual_seed(0)
    n, Zr = 29, 16
    pos = torch.randint(0, 5000, (n,), generator=g)
    q, k = torch.randn(2, n, Zr, generator=g).unbind(0)
    cos, sin = rotary_cos_sin(pos[None], Zr, 10000.0)
    perm = interleave(Zr)
    assert sorted(perm.tolist()) == list(range(Zr)) and perm[:4].tolist() == [0, 8, 1, 9]
    for x in (q, k):
        half = apply_rotary(x[None, None], cos, sin)[0, 0]
        torch.testing.assert_close(half[:, perm], rope_interleaved(x[:, perm], pos, 10000.0))
    plait_scores = (
        apply_rotary(q[None, None], cos, sin)[0, 0]
        @ apply_rotary(k[None, None], cos, sin)[0, 0].t()
    )
    released_scores = (
        rope_interleaved(q[:, perm], pos, 1e4) @ rope_interleaved(k[:, perm], pos, 1e4).t()
    )
    torch.testing.assert_close(plait_scores, released_scores, rtol=1e-5, atol=1e-4)
    # a plain (unpermuted) reading of plait's channels as interleaved pairs is another function
    assert not torch.allclose(apply_rotary(q[None, None], cos, sin)[0, 0],
                              rope_interleaved(q, pos, 1e4), atol=1e-3)


# Options, router edge cases.


@pytest.mark.parametrize(
    "field,value",
    [("window", 0), ("ema_truncation", -1), ("router_temperature", 0.0), ("zdim", 7)],
)
def test_bad_options_are_refused(field, value):
    o = SeqBoatOptions()
    setattr(o, field, value)
    with pytest.raises(ModelConfigError, match=f"seqboat.{field}"):
        o.validate()


def _off(rt):
    cfg = _cfg("off")
    m = _layer(cfg)
    _randomise(m, 0)
    x, pos, _ = _inputs(0, False)
    y, _, grads = _fwd_bwd(m, m, x, pos, None)
    hx, _ = m.w_hx(F.silu(m.ema(x, None, SequenceParallel())))
    return y, F.silu(hx).detach(), grads


def test_router_all_off_attention_contributes_nothing():
    y, silu_hx, grads = run_distributed(_off, 1)[0]
    torch.testing.assert_close(y, silu_hx, rtol=0, atol=0)
    for name in ATTENTION:
        assert grads[name].abs().max() == 0, name
    assert grads["w_hx.weight"].abs().max() > 0  # the rest of the layer still learns
    assert grads["w_hx.bias"].abs().max() > 0


def test_gradients_reach_the_router():
    fast, _, _ = run_distributed(_compare, 1, _cfg("learned", 5), 0, False)[0]
    grads = fast[2]
    for name in ("w_router", "b_router"):
        assert grads[name].abs().max() > 1e-6, name
    assert grads["log_tau"].abs() > 1e-8


def test_enwik8_preset_is_the_released_script():
    """slag_lm_enwik8_base_v2 with the README's flags (docs/fidelity/seqboat.md section 6)."""
    from plait.models.presets import get_preset

    cfg = get_preset("seqboat-enwik8")
    o = cfg.seqboat
    assert (cfg.pattern, cfg.hidden_size, cfg.mlp, cfg.norm, cfg.norm_eps) == (
        "S" * 14, 616, "none", "layernorm", 1e-5
    )
    assert cfg.embed_scale and cfg.tie_embeddings and cfg.vocab_size == 256
    assert (o.value_dim(616), o.zdim, o.ema_dim, o.window, o.ema_truncation) == (
        1232, 128, 16, 1025, 2048
    )
    assert (o.router_temperature, o.bias, o.router) == (1.0, True, "learned")
