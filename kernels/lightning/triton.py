"""Triton kernels for lightning attention on the chunk decomposition, the fast path on CUDA.

The sequence is cut into chunks of BT tokens (the tables M, qd, kd, c of chunk.py, zeroed
across document boundaries; the last chunk is masked, not padded, so the final state is exact).
Forward, two kernels:
  * ``_state_fwd``, grid (D/BK, E/BV, B*H): one program per BK x BV tile of the state sweeps
    the chunks in order, S_{i+1} = c S_i + K_i^T (kd * V_i), and writes S_i, the state entering
    chunk i, once to a [B*H, NT, D, E] float32 buffer (and the final state).
  * ``_out_fwd``, grid (E/BV, NT, B*H): every chunk in parallel,
    O_i = ((Q_i K_i^T) * M) V_i + qd * (Q_i S_i), the D contraction looped in BK tiles.
Backward, three: ``_dstate_bwd`` sweeps the chunks in reverse for dS_{i+1}, the state gradient
leaving chunk i (dS_i = c dS_{i+1} + Q_i^T (qd * dO_i)); ``_dv_bwd`` (grid E/BV x NT x B*H)
and ``_dqdk_bwd`` (grid D/BK x NT x B*H) then form
  dV = (P^T * M^T) dO + kd * (K dS_{i+1}),   dQ = (dP * M) K + qd * (dO S_i^T),
  dK = (dP * M)^T Q + kd * (V dS_{i+1}^T),    dP = dO V^T,
each chunk independently. The forward states are recomputed in backward (one cheap sweep)
rather than kept.

So no program holds more than a 64 x 64 state tile, the chunk work is spread over
NT x B*H programs, and D, E of any size (Based's 153 x 65) are tiled with masks.

Precision: on a GPU the dot operands stay in the input dtype (bf16/fp16 on tensor cores) with
float32 accumulation; fp32 inputs use ``tf32x3`` (three TF32 products, about fp32 accuracy).
States and decay tables are float32. Under the CPU interpreter (how CI runs these kernels)
bf16 dots are silently wrong, so there ``UPCAST`` turns every tile into float32 and the dots
run in IEEE fp32. Base offsets are int64 (B*H*T*D passes 2^31 at about 1M tokens per GPU).

LASP-2's chunk state (parallel/lasp2.py, the state each rank all-gathers) is ``_state_fwd``'s
final state with nothing written per chunk (``lightning_chunk_state_triton``). The device
guard, doc-id handling and autotune config list are shared with the other Triton kernels
(kernels/triton_common.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from plait.kernels.triton_common import (
    INTERPRET,
    autotune_configs,
    check_device,
    check_slopes,
    keep,
    on_device,
    prepare_doc_ids,
    sm_count,
    smem_limit,
    spill_named,
    spilling,
)


# ---------------------------------------------------------------- autotuning
def _smem_per_stage(kernel: str, BT: int, BK: int, BV: int, isz: int) -> int:
    """Bytes of the tiles a pipelined loop iteration loads (what num_stages multiplies)."""
    return {
        "state": BT * BK * isz + BT * BV * isz,
        "local": BT * BK * isz + BT * BV * isz,
        "out": 2 * BT * BK * isz + BK * BV * 4,
        "dstate": BT * BK * isz + BT * BV * isz,
        "dv": 2 * BT * BK * isz + BK * BV * 4,
        "dqdk": 2 * BT * BV * isz + 2 * BK * BV * 4,
    }[kernel]


def min_warps(kernel: str, fp32: bool) -> int:
    """Fewer warps spill registers (kernels/launches.py, sm_80): fp32's tf32x3 splits every
    operand in two, and dq/dk keep three BT x BT-sized accumulators."""
    return 8 if fp32 or kernel == "dqdk" else 4


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        BT, BK, BV = kwargs["BT"], kwargs["BK"], kwargs["BV"]
        ptr = next(named_args[n] for n in ("Q", "K", "X") if n in named_args)
        isz = 4 if (kwargs.get("UPCAST") or ptr.dtype == torch.float32) else 2
        per = _smem_per_stage(kernel, BT, BK, BV, isz)
        # fixed part: the BT x BT score tile and its operand copy, a margin for the rest
        fixed = BT * BT * (4 + isz) + 16 * 1024
        limit = smem_limit()
        kept = [
            c
            for c in configs
            if fixed + max(1, c.num_stages) * per <= limit
            and c.num_warps >= min_warps(kernel, isz == 4 and not kwargs.get("UPCAST"))
        ]
        return keep(kept, configs,
                    lambda c: spilling(f"lightning.{kernel}", isz, named_args, kwargs, c))

    return prune


def _autotune(kernel: str):
    return spill_named(f"lightning.{kernel}", triton.autotune(
        configs=autotune_configs(),
        key=["D", "E", "BT", "BK", "BV", "HAS_DOCS", "HAS_G"],
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    ))


# ---------------------------------------------------------------- device helpers
@triton.jit
def _tables(
    s, offs_t, start, T, doc_ptr, g_ptr,
    HAS_DOCS: tl.constexpr, TRANS: tl.constexpr, HAS_G: tl.constexpr,
):
    """The chunk's decay tables; M is [t, j] (or [j, t] with TRANS). With HAS_G, ``g_ptr``
    holds G, the running sum of g - s inside each chunk (the host's ``_chunk_log_decay``)."""
    tmask = start + offs_t < T
    L = tl.minimum(T - start, offs_t.shape[0])
    pos = tl.cast(offs_t, tl.float32)
    if TRANS:
        diff = pos[None, :] - pos[:, None]
    else:
        diff = pos[:, None] - pos[None, :]
    if HAS_G:
        gc = tl.load(g_ptr + start + offs_t, mask=tmask, other=0.0)
        g_end = tl.load(g_ptr + start + L - 1)
        if TRANS:
            expo = gc[None, :] - gc[:, None]
        else:
            expo = gc[:, None] - gc[None, :]
        M = tl.where(diff >= 0, tl.exp(tl.minimum(expo, 0.0)), 0.0)
        qd = tl.exp(gc)
        kd = tl.where(tmask, tl.exp(tl.minimum(g_end - gc, 0.0)), 0.0)
        carry = tl.exp(g_end)
    else:
        Lf = tl.cast(L, tl.float32)
        M = tl.where(diff >= 0, tl.exp(-s * tl.maximum(diff, 0.0)), 0.0)
        qd = tl.exp(-s * (pos + 1.0))
        kd = tl.where(tmask, tl.exp(-s * tl.maximum(Lf - 1.0 - pos, 0.0)), 0.0)
        carry = tl.exp(-s * Lf)
    if HAS_DOCS:
        d = tl.load(doc_ptr + start + offs_t, mask=tmask, other=-1)
        prev = tl.load(doc_ptr + tl.maximum(start - 1, 0))
        end = tl.load(doc_ptr + start + L - 1)
        M = tl.where(d[:, None] == d[None, :], M, 0.0)
        qd = tl.where(d == prev, qd, 0.0)
        kd = tl.where(d == end, kd, 0.0)
        carry = tl.where(prev == end, carry, 0.0)
    return M, qd, kd, carry


@triton.jit
def _tile(ptr, offs_t, offs_f, T, F, UPCAST: tl.constexpr):
    """A [len(offs_t), len(offs_f)] tile of a row-major [T, F] matrix, zero outside."""
    m = (offs_t < T)[:, None] & (offs_f < F)[None, :]
    x = tl.load(ptr + offs_t[:, None] * F + offs_f[None, :], mask=m, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _state_tile(ptr, offs_k, offs_v, D, E):
    m = (offs_k < D)[:, None] & (offs_v < E)[None, :]
    return tl.load(ptr + offs_k[:, None] * E + offs_v[None, :], mask=m, other=0.0)


@triton.jit
def _put_state(ptr, S, offs_k, offs_v, D, E):
    m = (offs_k < D)[:, None] & (offs_v < E)[None, :]
    tl.store(ptr + offs_k[:, None] * E + offs_v[None, :], S, mask=m)


# ---------------------------------------------------------------- forward
@_autotune("state")
@triton.jit(do_not_specialize=["T"])
def _state_fwd(
    K, V, STATES, SLOPES, DOC, G, S_INIT, S_FINAL,
    T, H, D, E, NT,
    HAS_DOCS: tl.constexpr, HAS_INIT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, WRITE_STATES: tl.constexpr = True,
    HAS_G: tl.constexpr = False,
):
    pid_k, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh64 = tl.cast(bh, tl.int64)
    s = tl.load(SLOPES + bh % H).to(tl.float32)
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ptr, v_ptr = K + bh64 * T * D, V + bh64 * T * E
    doc_ptr, g_ptr = DOC + (bh64 // H) * T, G + bh64 * T
    st_ptr = STATES + bh64 * NT * D * E
    S = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_INIT:
        S = _state_tile(S_INIT + bh64 * D * E, offs_k, offs_v, D, E).to(tl.float32)
    for i in range(0, NT):
        start = i * BT
        if WRITE_STATES:
            _put_state(st_ptr + tl.cast(i, tl.int64) * D * E, S, offs_k, offs_v, D, E)
        _, _, kd, carry = _tables(s, offs_t, start, T, doc_ptr, g_ptr, HAS_DOCS, False, HAS_G)
        k = _tile(k_ptr, start + offs_t, offs_k, T, D, UPCAST)
        v = _tile(v_ptr, start + offs_t, offs_v, T, E, UPCAST)
        vk = (v.to(tl.float32) * kd[:, None]).to(v.dtype)
        S = carry * S + tl.dot(tl.trans(k), vk, input_precision=PREC)
    _put_state(S_FINAL + bh64 * D * E, S, offs_k, offs_v, D, E)


@_autotune("out")
@triton.jit(do_not_specialize=["T"])
def _out_fwd(
    Q, K, V, O, STATES, SLOPES, DOC, G,
    T, H, D, E, NT,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr = False,
):
    pid_v, i, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh64 = tl.cast(bh, tl.int64)
    s = tl.load(SLOPES + bh % H).to(tl.float32)
    start = i * BT
    offs_t = start + tl.arange(0, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    q_ptr, k_ptr = Q + bh64 * T * D, K + bh64 * T * D
    st_ptr = STATES + (bh64 * NT + i) * D * E
    scores = tl.zeros((BT, BT), dtype=tl.float32)
    o = tl.zeros((BT, BV), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        q = _tile(q_ptr, offs_t, offs_k, T, D, UPCAST)
        k = _tile(k_ptr, offs_t, offs_k, T, D, UPCAST)
        S = _state_tile(st_ptr, offs_k, offs_v, D, E).to(q.dtype)
        scores += tl.dot(q, tl.trans(k), input_precision=PREC)
        o += tl.dot(q, S, input_precision=PREC)
    M, qd, _, _ = _tables(
        s, tl.arange(0, BT), start, T, DOC + (bh64 // H) * T, G + bh64 * T, HAS_DOCS, False, HAS_G
    )
    v = _tile(V + bh64 * T * E, offs_t, offs_v, T, E, UPCAST)
    o = o * qd[:, None] + tl.dot((scores * M).to(v.dtype), v, input_precision=PREC)
    om = (offs_t < T)[:, None] & (offs_v < E)[None, :]
    o_ptrs = O + bh64 * T * E + offs_t[:, None] * E + offs_v[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=om)


# ---------------------------------------------------------------- backward
@_autotune("dstate")
@triton.jit(do_not_specialize=["T"])
def _dstate_bwd(
    Q, DO, DSTATES, SLOPES, DOC, G, DS_FINAL, DS_INIT,
    T, H, D, E, NT,
    HAS_DOCS: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr = False,
):
    pid_k, pid_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh64 = tl.cast(bh, tl.int64)
    s = tl.load(SLOPES + bh % H).to(tl.float32)
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    q_ptr, do_ptr = Q + bh64 * T * D, DO + bh64 * T * E
    doc_ptr, g_ptr = DOC + (bh64 // H) * T, G + bh64 * T
    st_ptr = DSTATES + bh64 * NT * D * E
    dS = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_DFINAL:
        dS = _state_tile(DS_FINAL + bh64 * D * E, offs_k, offs_v, D, E).to(tl.float32)
    for j in range(0, NT):
        i = NT - 1 - j
        start = i * BT
        _put_state(st_ptr + tl.cast(i, tl.int64) * D * E, dS, offs_k, offs_v, D, E)
        _, qd, _, carry = _tables(s, offs_t, start, T, doc_ptr, g_ptr, HAS_DOCS, False, HAS_G)
        q = _tile(q_ptr, start + offs_t, offs_k, T, D, UPCAST)
        do = _tile(do_ptr, start + offs_t, offs_v, T, E, UPCAST)
        dod = (do.to(tl.float32) * qd[:, None]).to(do.dtype)
        dS = carry * dS + tl.dot(tl.trans(q), dod, input_precision=PREC)
    if HAS_INIT:
        _put_state(DS_INIT + bh64 * D * E, dS, offs_k, offs_v, D, E)


@_autotune("dv")
@triton.jit(do_not_specialize=["T"])
def _dv_bwd(
    Q, K, DO, DV, DSTATES, SLOPES, DOC, G,
    T, H, D, E, NT,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr = False,
):
    pid_v, i, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh64 = tl.cast(bh, tl.int64)
    s = tl.load(SLOPES + bh % H).to(tl.float32)
    start = i * BT
    offs_t = start + tl.arange(0, BT)
    offs_v = pid_v * BV + tl.arange(0, BV)
    q_ptr, k_ptr = Q + bh64 * T * D, K + bh64 * T * D
    st_ptr = DSTATES + (bh64 * NT + i) * D * E
    pt = tl.zeros((BT, BT), dtype=tl.float32)  # P^T: [j, t] = k_j . q_t
    dv = tl.zeros((BT, BV), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        q = _tile(q_ptr, offs_t, offs_k, T, D, UPCAST)
        k = _tile(k_ptr, offs_t, offs_k, T, D, UPCAST)
        dS = _state_tile(st_ptr, offs_k, offs_v, D, E).to(k.dtype)
        pt += tl.dot(k, tl.trans(q), input_precision=PREC)
        dv += tl.dot(k, dS, input_precision=PREC)
    MT, _, kd, _ = _tables(
        s, tl.arange(0, BT), start, T, DOC + (bh64 // H) * T, G + bh64 * T, HAS_DOCS, True, HAS_G
    )
    do = _tile(DO + bh64 * T * E, offs_t, offs_v, T, E, UPCAST)
    dv = dv * kd[:, None] + tl.dot((pt * MT).to(do.dtype), do, input_precision=PREC)
    m = (offs_t < T)[:, None] & (offs_v < E)[None, :]
    tl.store(
        DV + bh64 * T * E + offs_t[:, None] * E + offs_v[None, :],
        dv.to(DV.dtype.element_ty),
        mask=m,
    )


@_autotune("dqdk")
@triton.jit(do_not_specialize=["T"])
def _dqdk_bwd(
    Q, K, V, DO, DQ, DK, STATES, DSTATES, SLOPES, DOC, G,
    T, H, D, E, NT,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr = False,
):
    pid_k, i, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh64 = tl.cast(bh, tl.int64)
    s = tl.load(SLOPES + bh % H).to(tl.float32)
    start = i * BT
    offs_t = start + tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    v_ptr, do_ptr = V + bh64 * T * E, DO + bh64 * T * E
    st_off = (bh64 * NT + i) * D * E
    dp = tl.zeros((BT, BT), dtype=tl.float32)
    dq = tl.zeros((BT, BK), dtype=tl.float32)
    dk = tl.zeros((BT, BK), dtype=tl.float32)
    for v0 in range(0, E, BV):
        offs_v = v0 + tl.arange(0, BV)
        v = _tile(v_ptr, offs_t, offs_v, T, E, UPCAST)
        do = _tile(do_ptr, offs_t, offs_v, T, E, UPCAST)
        S = _state_tile(STATES + st_off, offs_k, offs_v, D, E).to(v.dtype)
        dS = _state_tile(DSTATES + st_off, offs_k, offs_v, D, E).to(v.dtype)
        dp += tl.dot(do, tl.trans(v), input_precision=PREC)
        dq += tl.dot(do, tl.trans(S), input_precision=PREC)
        dk += tl.dot(v, tl.trans(dS), input_precision=PREC)
    M, qd, kd, _ = _tables(
        s, tl.arange(0, BT), start, T, DOC + (bh64 // H) * T, G + bh64 * T, HAS_DOCS, False, HAS_G
    )
    q = _tile(Q + bh64 * T * D, offs_t, offs_k, T, D, UPCAST)
    k = _tile(K + bh64 * T * D, offs_t, offs_k, T, D, UPCAST)
    dpm = (dp * M).to(k.dtype)
    dq = dq * qd[:, None] + tl.dot(dpm, k, input_precision=PREC)
    dk = dk * kd[:, None] + tl.dot(tl.trans(dpm), q, input_precision=PREC)
    m = (offs_t < T)[:, None] & (offs_k < D)[None, :]
    offs = offs_t[:, None] * D + offs_k[None, :]
    tl.store(DQ + bh64 * T * D + offs, dq.to(DQ.dtype.element_ty), mask=m)
    tl.store(DK + bh64 * T * D + offs, dk.to(DK.dtype.element_ty), mask=m)


# ---------------------------------------------------------------- chunk-parallel state form
@_autotune("local")
@triton.jit(do_not_specialize=["T"])
def _chunk_local(
    X, Y, LOCAL, SLOPES, DOC, G,
    T, H, D, E, NT,
    HAS_DOCS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr = False,
    BWD: tl.constexpr = False,
):
    """Every chunk's own contribution to the state, all chunks at once: K_i^T (kd * V_i)
    (forward), or Q_i^T (qd * dO_i) with ``BWD`` (X = Q, Y = dO). Grid (D/BK, E/BV,
    B*H*NT): at batch 1 the chunks fill the GPU that the (D/BK, E/BV, B*H) sweep leaves
    idle; ``_combine`` then carries the states across chunks."""
    pid_k, pid_v, pid = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bh64 = tl.cast(pid // NT, tl.int64)
    i = pid % NT
    s = tl.load(SLOPES + bh64 % H).to(tl.float32)
    start = i * BT
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    _, qd, kd, _ = _tables(
        s, offs_t, start, T, DOC + (bh64 // H) * T, G + bh64 * T, HAS_DOCS, False, HAS_G
    )
    x = _tile(X + bh64 * T * D, start + offs_t, offs_k, T, D, UPCAST)
    y = _tile(Y + bh64 * T * E, start + offs_t, offs_v, T, E, UPCAST)
    f = qd if BWD else kd
    yf = (y.to(tl.float32) * f[:, None]).to(y.dtype)
    L = tl.dot(tl.trans(x), yf, input_precision=PREC)
    _put_state(LOCAL + (bh64 * NT + i) * D * E, L, offs_k, offs_v, D, E)


@triton.jit
def _combine(
    BUF, CARRY, S_START, S_END, NT, DE,
    HAS_START: tl.constexpr, REVERSE: tl.constexpr, BLOCK: tl.constexpr,
):
    """The carry across chunks, elementwise: S <- c_i S + L_i in chunk order (reverse for
    the gradients), each chunk's slot of BUF overwritten by the state entering it (the
    gradient leaving it, with REVERSE) after its own L_i is read. Grid (DE / BLOCK, B*H)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    bh64 = tl.cast(bh, tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < DE
    S = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_START:
        S = tl.load(S_START + bh64 * DE + offs, mask=m, other=0.0)
    for j in range(0, NT):
        if REVERSE:
            i = NT - 1 - j
        else:
            i = j
        ptr = BUF + (bh64 * NT + i) * DE + offs
        L = tl.load(ptr, mask=m, other=0.0)
        tl.store(ptr, S, mask=m)
        S = tl.load(CARRY + bh64 * NT + i) * S + L
    tl.store(S_END + bh64 * DE + offs, S, mask=m)


COMBINE_BLOCK = 512
"""Elements of a state each ``_combine`` program carries: a 128 x 128 state is 32 programs
per head, so 16 heads at batch 1 give 512 programs, over twice an H100's 132 SMs."""


def state_form(B: int, H: int, D: int, E: int, NT: int, meta: dict) -> str:
    """"parallel" when the sequential sweep's (D/BK) (E/BV) B H programs would not fill twice
    the GPU's SMs and there are chunks enough to parallelise over (batch-1 long context),
    else "sequential" (large batches, short sequences: one pass, no extra state traffic).
    ``PLAIT_LIGHTNING_STATE_FORM`` forces one (tests)."""
    forced = os.environ.get("PLAIT_LIGHTNING_STATE_FORM", "")
    if forced in ("parallel", "sequential"):
        return forced
    programs = B * H * triton.cdiv(D, meta["BK"]) * triton.cdiv(E, meta["BV"])
    return "parallel" if NT >= 4 and programs < 2 * sm_count() else "sequential"


def chunk_carries(T: int, BT: int, slopes32, docs, gc, has_docs: bool, B: int) -> torch.Tensor:
    """c_i, what the state entering chunk i keeps when it leaves: exp(-s L_i) or, with
    per-token decays, exp(G at the chunk's last token); 0 where the chunk starts a new
    document (as ``_tables`` computes it). [B*H, NT] float32."""
    H = slopes32.shape[0]
    NT = triton.cdiv(T, BT)
    starts = torch.arange(NT, device=slopes32.device) * BT
    ends = torch.clamp(starts + BT, max=T) - 1
    if gc.numel() > 1:
        c = torch.exp(gc[..., ends])  # [B, H, NT]
    else:
        c = torch.exp(-slopes32[:, None] * (ends - starts + 1).float())[None].expand(B, H, NT)
    if has_docs:
        prev = docs[:, (starts - 1).clamp_min(0)]
        c = c * (prev == docs[:, ends]).float()[:, None]
    return c.reshape(B * H, NT).contiguous()


def _state_sweep(x, y, slopes32, docs, gc, start, end, has_docs, meta, reverse):
    """The chunk-parallel form of ``_state_fwd`` (reverse=False: x = K, y = V) or of
    ``_dstate_bwd`` (reverse=True: x = Q, y = dO): [B*H, NT, D, E] float32 states (the
    state entering each chunk, or the gradient leaving it), ``end`` written."""
    B, H, T, D = x.shape
    E = y.shape[-1]
    NT = triton.cdiv(T, meta["BT"])
    carries = chunk_carries(T, meta["BT"], slopes32, docs, gc, has_docs, B)
    buf = torch.empty(B * H, NT, D, E, device=x.device, dtype=torch.float32)
    has_g = gc.numel() > 1
    _chunk_local[(triton.cdiv(D, meta["BK"]), triton.cdiv(E, meta["BV"]), B * H * NT)](
        x, y, buf, slopes32, docs, gc, T, H, D, E, NT,
        HAS_DOCS=has_docs, HAS_G=has_g, BWD=reverse, **meta,
    )
    _combine[(triton.cdiv(D * E, COMBINE_BLOCK), B * H)](
        buf, carries, start, end, NT, D * E,
        HAS_START=start.numel() > 1, REVERSE=reverse, BLOCK=COMBINE_BLOCK,
    )
    return buf


# ---------------------------------------------------------------- host side
def feature_tile(n: int, widest: int = 64) -> int:
    """Tile width for a head dim: at most ``widest`` (so a state tile is <= 64 x 64), at
    least 16 (tl.dot's minimum), the one that pads ``n`` least (ties to the wider tile)."""
    best = None
    for w in (64, 32, 16):
        if w > widest:
            continue
        padded = triton.cdiv(n, w) * w
        if best is None or padded < best[0]:
            best = (padded, w)
    return best[1]


def plan(D: int, E: int, dtype: torch.dtype, block: int, interpret: bool = INTERPRET) -> dict:
    """The constexprs every kernel of one call gets (shared with the compile test)."""
    if block < 16 or block & (block - 1) or block > 128:
        raise ValueError(
            f"lightning_attention (triton): block must be a power of two in [16, 128], got {block}"
        )
    if interpret:
        prec = "ieee"
    else:
        prec = "tf32x3" if dtype == torch.float32 else "ieee"  # ieee is unused for 16-bit dots
    # tf32x3 splits every fp32 operand in two: 64 x 64 tiles spill, 32 x 32 do not (sm_90)
    widest = 32 if dtype == torch.float32 else 64
    return dict(
        UPCAST=interpret,
        PREC=prec,
        BT=block,
        BK=feature_tile(D, widest),
        BV=feature_tile(E, widest),
    )


def dqdk_meta(meta: dict, dtype: torch.dtype) -> dict:
    """``_dqdk_bwd``'s tiles: narrower than the other kernels'. It keeps three accumulators
    across its loop over value tiles (dp, BT x BT; dq and dk, BT x BK), and with the shared
    tiles every configuration spilled at Based-1.3b's widths on sm_80 (bf16 BK 32 x BV 64:
    360-620 B per thread; fp32, whose tf32x3 dots split every operand in two, BK = BV = 32:
    1.5-1.8 KB, and 152-192 B on sm_90). bf16 with BV 32 and fp32 with 16 x 16 spill at no
    shape on either target (kernels/launches.py, docs/benchmarks.md "Compile"). A K tile is
    one program (the grid follows BK); the value tile only sets the loop's step."""
    fp32 = dtype == torch.float32
    return dict(meta, BK=min(meta["BK"], 16) if fp32 else meta["BK"],
                BV=min(meta["BV"], 16 if fp32 else 32))


def _chunk_log_decay(g, slopes32, BT: int, like: torch.Tensor) -> torch.Tensor:
    """G for the kernels' tables: the running sum of g - s inside each BT-token chunk,
    float32 [B, H, T] (the dummy one-element tensor without per-token decays)."""
    if g is None:
        return like.new_zeros(1, dtype=torch.float32)
    B, H, T = g.shape
    NT = triton.cdiv(T, BT)
    x = g.to(device=like.device, dtype=torch.float32) - slopes32[None, :, None]
    x = torch.nn.functional.pad(x, (0, NT * BT - T)).view(B, H, NT, BT).cumsum(-1)
    return x.view(B, H, NT * BT)[..., :T].contiguous()


def _launch_forward(q, k, v, slopes32, docs, init, has_docs, meta, need_out=True, gc=None):
    B, H, T, D = q.shape
    E = v.shape[-1]
    NT = triton.cdiv(T, meta["BT"])
    states = torch.empty(B * H, NT, D, E, device=q.device, dtype=torch.float32)
    final = torch.empty(B, H, D, E, device=q.device, dtype=torch.float32)
    BK, BV = meta["BK"], meta["BV"]
    has_g = gc is not None and gc.numel() > 1
    if gc is None:
        gc = q.new_zeros(1, dtype=torch.float32)
    if state_form(B, H, D, E, NT, meta) == "parallel":
        states = _state_sweep(k, v, slopes32, docs, gc, init, final, has_docs, meta,
                              reverse=False)
    else:
        _state_fwd[(triton.cdiv(D, BK), triton.cdiv(E, BV), B * H)](
            k, v, states, slopes32, docs, gc, init, final, T, H, D, E, NT,
            HAS_DOCS=has_docs, HAS_INIT=init.numel() > 1, HAS_G=has_g, **meta,
        )
    o = None
    if need_out:
        o = torch.empty(B, H, T, E, device=q.device, dtype=q.dtype)
        _out_fwd[(triton.cdiv(E, BV), NT, B * H)](
            q, k, v, o, states, slopes32, docs, gc, T, H, D, E, NT,
            HAS_DOCS=has_docs, HAS_G=has_g, **meta,
        )
    return o, final, states


class _LightningTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slopes, doc_ids, initial_state, block, g):
        q, k, v = (x.contiguous() for x in (q, k, v))
        meta = plan(q.shape[-1], v.shape[-1], q.dtype, block)
        slopes32 = slopes.to(device=q.device, dtype=torch.float32).contiguous()
        gc = _chunk_log_decay(g, slopes32, meta["BT"], q)
        docs = prepare_doc_ids(doc_ids, q, "lightning_attention")
        has_init = initial_state is not None
        init = (
            initial_state.to(device=q.device, dtype=torch.float32).contiguous()
            if has_init
            else q.new_zeros(1, dtype=torch.float32)
        )
        with on_device(q):
            o, final, _ = _launch_forward(
                q, k, v, slopes32, docs, init, doc_ids is not None, meta, gc=gc
            )
        ctx.save_for_backward(q, k, v, slopes32, docs, init, gc)
        ctx.has_docs, ctx.has_init, ctx.meta = doc_ids is not None, has_init, meta
        ctx.init_dtype = initial_state.dtype if has_init else None
        ctx.g_dtype = g.dtype if g is not None else None
        return o, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        """The three kernels of the module docstring; with per-token decays, dg from dq and
        dk (chunk.token_decay_grad), which are then kept in float32 until it is formed."""
        q, k, v, slopes32, docs, init, gc = ctx.saved_tensors
        meta, has_docs = ctx.meta, ctx.has_docs
        B, H, T, D = q.shape
        E = v.shape[-1]
        NT = triton.cdiv(T, meta["BT"])
        BK, BV = meta["BK"], meta["BV"]
        has_g = ctx.g_dtype is not None
        need_g = has_g and ctx.needs_input_grad[7]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        need_q, need_k = need_q or need_g, need_k or need_g
        need_init = ctx.has_init and ctx.needs_input_grad[5]
        dq = dk = dv = d_init = dg = None
        with on_device(q):
            do = (
                d_out.contiguous()
                if d_out is not None
                else torch.zeros(B, H, T, E, device=q.device, dtype=q.dtype)
            )
            dfinal = (
                d_final.to(torch.float32).contiguous()
                if d_final is not None
                else q.new_zeros(1, dtype=torch.float32)
            )
            dinit = (
                torch.empty(B, H, D, E, device=q.device, dtype=torch.float32)
                if need_init
                else q.new_zeros(1, dtype=torch.float32)
            )
            if state_form(B, H, D, E, NT, meta) == "parallel":
                end = dinit if need_init else torch.empty(B, H, D, E, device=q.device)
                dstates = _state_sweep(q, do, slopes32, docs, gc, dfinal, end, has_docs, meta,
                                       reverse=True)
            else:
                dstates = torch.empty(B * H, NT, D, E, device=q.device, dtype=torch.float32)
                _dstate_bwd[(triton.cdiv(D, BK), triton.cdiv(E, BV), B * H)](
                    q, do, dstates, slopes32, docs, gc, dfinal, dinit, T, H, D, E, NT,
                    HAS_DOCS=has_docs, HAS_DFINAL=d_final is not None, HAS_INIT=need_init,
                    HAS_G=has_g, **meta,
                )
            if need_v:
                dv = torch.empty_like(v)
                _dv_bwd[(triton.cdiv(E, BV), NT, B * H)](
                    q, k, do, dv, dstates, slopes32, docs, gc, T, H, D, E, NT,
                    HAS_DOCS=has_docs, HAS_G=has_g, **meta,
                )
            if need_q or need_k:
                _, final, states = _launch_forward(
                    q, k, v, slopes32, docs, init, has_docs, meta, need_out=False, gc=gc
                )
                grad_dtype = torch.float32 if need_g else q.dtype
                dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
                dk = torch.empty(k.shape, device=k.device, dtype=grad_dtype)
                dqdk = dqdk_meta(meta, q.dtype)
                _dqdk_bwd[(triton.cdiv(D, dqdk["BK"]), NT, B * H)](
                    q, k, v, do, dq, dk, states, dstates, slopes32, docs, gc, T, H, D, E, NT,
                    HAS_DOCS=has_docs, HAS_G=has_g, **dqdk,
                )
                if need_g:
                    from .chunk import token_decay_grad

                    dg = token_decay_grad(q, dq, k, dk, final, d_final).to(ctx.g_dtype)
                    dq, dk = dq.to(q.dtype), dk.to(k.dtype)
        if need_init:
            d_init = dinit.to(ctx.init_dtype)
        need_q, need_k = ctx.needs_input_grad[:2]
        return (
            dq if need_q else None,
            dk if need_k else None,
            dv,
            None,
            None,
            d_init,
            None,
            dg,
        )


def lightning_attention_triton(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHDE: torch.Tensor | None = None,
    return_state: bool = False,
    block: int = 64,
    g_BHT: torch.Tensor | None = None,
):
    check_device(q_BHTD, k_BHTD, v_BHTE, what="lightning_attention")
    check_slopes(slopes_H, "lightning_attention")
    out, state = _LightningTriton.apply(
        q_BHTD, k_BHTD, v_BHTE, slopes_H, doc_ids_BT, initial_state_BHDE, block, g_BHT
    )
    return (out, state) if return_state else out


class _ChunkStateTriton(torch.autograd.Function):
    """The state a chunk hands on (LASP-2's M_r): the forward is ``_state_fwd``'s final state with
    nothing written per chunk, or, where that sweep would leave the GPU idle (batch 1, few
    heads: ``state_form``), the chunk-parallel form's. The backward needs no kernel of its
    own: with one state gradient dF for the whole chunk, dK = kd * (V dF^T) and dV = kd * (K
    dF) are two batched GEMMs with no recurrence (kd_t = lambda^(T-1-t) on the chunk's last
    document), which cuBLAS runs at full rate. Per-token decays (``g``) weigh k_j by
    exp(G_end - G_j), and their gradient is the reverse running sum of -k_j . dk_j (+ <dF,
    F> at the last token)."""

    @staticmethod
    def forward(ctx, k, v, slopes, doc_ids, block, g):
        k, v = k.contiguous(), v.contiguous()
        B, H, T, D = k.shape
        E = v.shape[-1]
        meta = plan(D, E, k.dtype, block)
        slopes32 = slopes.to(device=k.device, dtype=torch.float32).contiguous()
        docs = prepare_doc_ids(doc_ids, k, "lightning_chunk_state")
        final = torch.empty(B, H, D, E, device=k.device, dtype=torch.float32)
        dummy = k.new_zeros(1, dtype=torch.float32)
        gc = _chunk_log_decay(g, slopes32, meta["BT"], k)
        NT = triton.cdiv(T, meta["BT"])
        with on_device(k):
            if state_form(B, H, D, E, NT, meta) == "parallel":  # batch 1: fill the GPU
                _state_sweep(k, v, slopes32, docs, gc, dummy, final, doc_ids is not None, meta,
                             reverse=False)
            else:
                _state_fwd[(triton.cdiv(D, meta["BK"]), triton.cdiv(E, meta["BV"]), B * H)](
                    k, v, dummy, slopes32, docs, gc, dummy, final, T, H, D, E, NT,
                    HAS_DOCS=doc_ids is not None, HAS_INIT=False, WRITE_STATES=False,
                    HAS_G=g is not None, **meta,
                )
        ctx.save_for_backward(k, v, slopes32, docs, g, final if g is not None else None)
        ctx.has_docs = doc_ids is not None
        return final

    @staticmethod
    def backward(ctx, d_final):
        from .chunk import chunk_state_weights, token_decay_grad

        k, v, slopes32, docs, g, final = ctx.saved_tensors
        kd = chunk_state_weights(slopes32, k.shape[2], docs if ctx.has_docs else None, g)
        kd = kd[..., None]
        dF = d_final.to(torch.float32)
        need_k, need_v = ctx.needs_input_grad[:2]
        need_g = g is not None and ctx.needs_input_grad[5]
        dk32 = kd * (v.float() @ dF.transpose(-1, -2)) if (need_k or need_g) else None
        dv = (kd * (k.float() @ dF)).to(v.dtype) if need_v else None
        dg = None
        if need_g:
            dg = token_decay_grad(None, None, k, dk32, final, dF).to(g.dtype)
        dk = dk32.to(k.dtype) if need_k else None
        return dk, dv, None, None, None, dg


def lightning_chunk_state_triton(
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    slopes_H: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    block: int = 64,
    g_BHT: torch.Tensor | None = None,
) -> torch.Tensor:
    """``lightning_chunk_state`` on the Triton state kernel (float32 [B, H, D, E]): the state
    tiled <= 64 x 64 per program, so Based's 153 x 65 and TransNormerLLM's 256 x 128 states
    run within an H100's shared memory, where the one-matmul PyTorch form materialises a
    decayed copy of K."""
    check_device(k_BHTD, v_BHTE, what="lightning_chunk_state")
    check_slopes(slopes_H, "lightning_chunk_state")
    return _ChunkStateTriton.apply(k_BHTD, v_BHTE, slopes_H, doc_ids_BT, block, g_BHT)
