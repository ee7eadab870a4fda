"""Triton sliding-window attention (FlashAttention-style), forward and backward.

Forward: one program per (query block, batch x head) runs an online softmax over the key
blocks that can fall inside the window, [q_start - w + 1, q_end), and saves the row
log-sum-exp. Backward recomputes the probabilities from it: one kernel per query block for
dQ, one per key block for dK, dV (looping over the query blocks whose windows reach it).
Work and memory are O(T * w): key blocks entirely outside the window are never visited, and
with packed documents neither are blocks across a document boundary: the wrapper computes,
once per call, each token's document start and end ([2, B, T] int32, from the non-decreasing
doc ids), and a query block's key loop starts at its first query's document start, a key
block's query loop stops after its last key's document end. A short document in a long
window then costs its own length, not the window's. Masked scores are -1e30 (finite), so a
block that a row cannot see contributes exactly zero once the row's own key has been seen.

Launch configuration: ``triton.autotune`` over warps and pipeline stages, pruned before any
benchmarking by an estimate of shared memory (what ``num_stages`` multiplies: the K/V or Q/dO
tiles of one loop iteration) against the device's limit, and by the fewest warps that do not
spill (``num_warps``) and the most stages that do not (``max_stages``), both measured with
kernels/launches.py, and by the spill table it writes (kernels/spills.json). One config under
the interpreter.

Precision: on a GPU the dot operands stay in the input dtype (bf16/fp16 tensor cores, the
probabilities cast to it as flash attention does) with float32 accumulation and softmax
statistics; fp32 inputs use ``tf32x3``. Under the CPU interpreter (CI) tiles are upcast to
float32 (``UPCAST``: bf16 dots are silently wrong there). Base offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.kernels.triton_common import (
    INTERPRET,
    autotune_configs,
    check_device,
    device_arch,
    keep,
    on_device,
    prepare_doc_ids,
    smem_limit,
    spill_named,
    spilling,
)

NEG: tl.constexpr = tl.constexpr(-1.0e30)  # a plain global is a NameError inside @jit on GPU
MAX_HEAD_DIM = 256


def num_warps(D: int, E: int, kernel: str = "fwd") -> int:
    """The fewest warps that do not spill on sm_80 or sm_90 (kernels/launches.py): 8 for
    heads over 64, and for dq from 64 (at 64, dk/dv spills with 8 warps on sm_80, not 4)."""
    return 8 if max(D, E) > 64 or (kernel == "dq" and max(D, E) >= 64) else 4


def max_stages(D: int, E: int, kernel: str, arch: int = 90) -> int:
    """Pipeline stages beyond which registers spill (kernels/launches.py): on sm_80 a third
    stage spills already at head dim 32 (forward) and 64 (dK/dV); on sm_90 only dK/dV at head
    dim 256 in bf16 (two 32 x 256 fp32 accumulators plus a third stage of Q/dO tiles pass 255
    registers, 16 B spilled)."""
    if arch < 90 or (kernel == "dkdv" and max(D, E) > 128):
        return 2
    return 3


def smem_estimate(kernel: str, BM: int, BN: int, BD: int, BE: int, isz: int, stages: int) -> int:
    """Bytes of shared memory a launch needs, roughly: the tiles one loop iteration loads
    (times ``stages``, which pipelining keeps in flight), the tiles loaded once, the
    BM x BN score tile and a margin for layout conversions."""
    per = {
        "fwd": BN * (BD + BE) * isz,
        "dq": BN * (BD + BE) * isz,
        "dkdv": BM * (BD + BE) * isz + 2 * BM * 4,
    }[kernel]
    fixed = {
        "fwd": BM * BD * isz,
        "dq": BM * (BD + BE) * isz,
        "dkdv": BN * (BD + BE) * isz,
    }[kernel]
    return fixed + max(1, stages) * per + BM * BN * (4 + isz) + 16 * 1024


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        isz = 4 if (kwargs.get("UPCAST") or named_args["Q"].dtype == torch.float32) else 2
        BM, BN, BD, BE = (kwargs[n] for n in ("BM", "BN", "BD", "BE"))
        D, E = named_args["D"], named_args["E"]
        limit, arch = smem_limit(), device_arch()
        kept = [
            c
            for c in configs
            if smem_estimate(kernel, BM, BN, BD, BE, isz, c.num_stages) <= limit
            and c.num_warps >= num_warps(D, E, kernel)
            and c.num_stages <= max_stages(D, E, kernel, arch)
        ]
        return keep(kept, configs,
                    lambda c: spilling(f"swa.{kernel}", isz, named_args, kwargs, c))

    return prune


def _autotune(kernel: str):
    return spill_named(f"swa.{kernel}", triton.autotune(
        configs=autotune_configs(),
        key=["D", "E", "BM", "BN", "HAS_DOCS"],
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    ))


@triton.jit
def _mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS: tl.constexpr):
    dist = offs_m[:, None] - offs_n[None, :]
    m = (dist >= 0) & (dist < window) & (offs_n[None, :] < T) & (offs_m[:, None] < T)
    if HAS_DOCS:
        dq = tl.load(doc_ptr + offs_m, mask=offs_m < T, other=-1)
        dk = tl.load(doc_ptr + offs_n, mask=offs_n < T, other=-2)
        m = m & (dq[:, None] == dk[None, :])
    return m


@triton.jit
def _tile(ptr, offs, offs_f, T, F, UPCAST: tl.constexpr):
    m = (offs < T)[:, None] & (offs_f < F)[None, :]
    x = tl.load(ptr + offs[:, None] * F + offs_f[None, :], mask=m, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@_autotune("fwd")
@triton.jit(do_not_specialize=["T"])
def _fwd(
    Q, K, V, O, LSE, DOC, BOUNDS, T, H, D, E, window, scale,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):
    start_m = tl.program_id(0) * BM
    bh = tl.cast(tl.program_id(1), tl.int64)
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    doc_ptr = DOC + (bh // H) * T
    q = _tile(Q + bh * T * D, offs_m, offs_d, T, D, UPCAST)
    m_i = tl.full((BM,), NEG, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, BE), tl.float32)
    lo = tl.maximum(start_m - window + 1, 0)
    if HAS_DOCS:  # nothing before the first query's document start
        lo = tl.maximum(lo, tl.load(BOUNDS + (bh // H) * T + start_m))
    lo = lo // BN * BN
    hi = tl.minimum(start_m + BM, T)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = _tile(K + bh * T * D, offs_n, offs_d, T, D, UPCAST)
        v = _tile(V + bh * T * E, offs_n, offs_e, T, E, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(_mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS), s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    om = (offs_m < T)[:, None] & (offs_e < E)[None, :]
    o_ptrs = O + bh * T * E + offs_m[:, None] * E + offs_e[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=om)
    tl.store(LSE + bh * T + offs_m, m_i + tl.log(l_i), mask=offs_m < T)


@_autotune("dq")
@triton.jit(do_not_specialize=["T"])
def _bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, DOC, BOUNDS, T, H, D, E, window, scale,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):
    start_m = tl.program_id(0) * BM
    bh = tl.cast(tl.program_id(1), tl.int64)
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    doc_ptr = DOC + (bh // H) * T
    q = _tile(Q + bh * T * D, offs_m, offs_d, T, D, UPCAST)
    do = _tile(DO + bh * T * E, offs_m, offs_e, T, E, UPCAST)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros((BM, BD), tl.float32)
    lo = tl.maximum(start_m - window + 1, 0)
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(BOUNDS + (bh // H) * T + start_m))
    lo = lo // BN * BN
    hi = tl.minimum(start_m + BM, T)
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = _tile(K + bh * T * D, offs_n, offs_d, T, D, UPCAST)
        v = _tile(V + bh * T * E, offs_n, offs_e, T, E, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        mask = _mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS)
        p = tl.where(mask, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale
    qm = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    tl.store(
        DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qm
    )


@_autotune("dkdv")
@triton.jit(do_not_specialize=["T"])
def _bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, DOC, BOUNDS, T, H, D, E, window, scale,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
):
    start_n = tl.program_id(0) * BN
    bh = tl.cast(tl.program_id(1), tl.int64)
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_e = tl.arange(0, BE)
    doc_ptr = DOC + (bh // H) * T
    k = _tile(K + bh * T * D, offs_n, offs_d, T, D, UPCAST)
    v = _tile(V + bh * T * E, offs_n, offs_e, T, E, UPCAST)
    dk = tl.zeros((BN, BD), tl.float32)
    dv = tl.zeros((BN, BE), tl.float32)
    lo = start_n // BM * BM
    hi = tl.minimum(start_n + BN + window - 1, T)
    if HAS_DOCS:  # no query after the last key's document end
        last = tl.minimum(start_n + BN - 1, T - 1)
        B = tl.num_programs(1) // H
        hi = tl.minimum(hi, tl.load(BOUNDS + (B + bh // H) * T + last) + 1)
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        q = _tile(Q + bh * T * D, offs_m, offs_d, T, D, UPCAST)
        do = _tile(DO + bh * T * E, offs_m, offs_e, T, E, UPCAST)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        mask = _mask(offs_m, offs_n, T, window, doc_ptr, HAS_DOCS)
        p = tl.where(mask, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * scale
    km = (offs_n < T)[:, None] & (offs_d < D)[None, :]
    vm = (offs_n < T)[:, None] & (offs_e < E)[None, :]
    tl.store(
        DK + bh * T * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=km
    )
    tl.store(
        DV + bh * T * E + offs_n[:, None] * E + offs_e[None, :], dv.to(DV.dtype.element_ty), mask=vm
    )


def plan(D: int, E: int, dtype: torch.dtype, block: int, interpret: bool = INTERPRET) -> dict:
    """The constexprs of one call (shared with the compile test). The query/key blocks shrink
    for wide heads and for fp32 (tf32x3 doubles the operands) so nothing spills on sm_90."""
    if block < 16 or block & (block - 1) or block > 128:
        raise ValueError(f"swa (triton): block must be a power of two in [16, 128], got {block}")
    if max(D, E) > MAX_HEAD_DIM:
        raise ValueError(
            f"swa (triton): head dims up to {MAX_HEAD_DIM} (one tile per row), got D={D}, E={E}; "
            "use backend='chunk'"
        )
    BD, BE = (max(16, triton.next_power_of_2(n)) for n in (D, E))
    wide = max(BD, BE) > 64
    if not interpret:
        # measured with kernels/launches.py: these are the largest blocks that do not spill
        if dtype == torch.float32:
            if wide and max(BD, BE) > 128:
                raise ValueError(
                    f"swa (triton): fp32 with head dims over 128 (D={D}, E={E}) spills registers "
                    "on sm_80/sm_90 even at 16-token blocks; use bf16 or backend='chunk'"
                )
            block = min(block, 16)
        elif wide:
            block = min(block, 32)
    prec = "ieee" if interpret or dtype != torch.float32 else "tf32x3"
    return dict(UPCAST=interpret, PREC=prec, BM=block, BN=block, BD=BD, BE=BE)


def doc_bounds(docs: torch.Tensor, T: int) -> torch.Tensor:
    """[2, B, T] int32: each token's document start and (inclusive) end, from non-decreasing
    doc ids. Computed once per call on the kernels' device (two scans), so the kernels skip
    blocks across document boundaries with one load each instead of searching."""
    B = docs.shape[0]
    idx = torch.arange(T, device=docs.device, dtype=torch.int32).expand(B, T)
    first = torch.ones(B, T, dtype=torch.bool, device=docs.device)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    last = torch.ones(B, T, dtype=torch.bool, device=docs.device)
    last[:, :-1] = first[:, 1:]
    start = torch.where(first, idx, 0).cummax(1).values
    end = torch.where(last, idx, T - 1).flip(1).cummin(1).values.flip(1)
    return torch.stack([start, end]).to(torch.int32).contiguous()


class _SwaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, doc_ids, scale, block):
        q, k, v = (x.contiguous() for x in (q, k, v))
        B, H, T, D = q.shape
        E = v.shape[-1]
        meta = plan(D, E, q.dtype, block)
        docs = prepare_doc_ids(doc_ids, q, "swa")
        has_docs = doc_ids is not None
        bounds = doc_bounds(docs, T) if has_docs else docs.new_zeros(1, dtype=torch.int32)
        o = torch.empty(B, H, T, E, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(T, meta["BM"]), B * H)
        with on_device(q):
            _fwd[grid](q, k, v, o, lse, docs, bounds, T, H, D, E, window, scale,
                       HAS_DOCS=has_docs, **meta)
        ctx.save_for_backward(q, k, v, o, lse, docs, bounds)
        ctx.window, ctx.scale, ctx.meta, ctx.has_docs = window, scale, meta, has_docs
        return o

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, o, lse, docs, bounds = ctx.saved_tensors
        B, H, T, D = q.shape
        meta = ctx.meta
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dk = dv = None
        with on_device(q):
            do = d_out.contiguous()
            delta = (do.float() * o.float()).sum(-1).contiguous()
            args = (docs, bounds, T, H, D, v.shape[-1], ctx.window, ctx.scale)
            if need_q:
                dq = torch.empty_like(q)
                _bwd_dq[(triton.cdiv(T, meta["BM"]), B * H)](
                    q, k, v, do, dq, lse, delta, *args, HAS_DOCS=ctx.has_docs, **meta
                )
            if need_k or need_v:
                dk, dv = torch.empty_like(k), torch.empty_like(v)
                _bwd_dkdv[(triton.cdiv(T, meta["BN"]), B * H)](
                    q, k, v, do, dk, dv, lse, delta, *args, HAS_DOCS=ctx.has_docs, **meta
                )
        return dq, dk if need_k else None, dv if need_v else None, None, None, None, None


def swa_triton(q, k, v, window, doc_ids=None, scale=None, block: int = 64):
    check_device(q, k, v, what="swa")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _SwaTriton.apply(q, k, v, window, doc_ids, float(scale), block)
