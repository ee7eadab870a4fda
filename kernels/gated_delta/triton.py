"""The GPU path of the gated delta rule: the chunked form's sequential part as one Triton
kernel each way, the rest batched PyTorch (cuBLAS GEMMs and one batched triangular solve).

chunk.py reduces every chunk n to an affine map of the state, S_{n+1} = P_n S_n + M_n (P_n
[K, K], M_n [K, V] per head, formed for all chunks at once). What is left sequential is this
scan; run from Python it is N small launches forward and more backward (N = T / 64: 128
chunks at 8K tokens, 1,024 at 64K), so on a GPU it is one program per (value block, head):
  * ``_scan_fwd``: S <- S_0; for n: write S to S_IN[n]; S <- P_n S + M_n; write S_FINAL.
  * ``_scan_bwd``: G <- dS_FINAL; for n from the last: write G to DM[n] (the gradient of
    M_n is the gradient of S_{n+1}); G <- P_n^T G + dS_IN[n]; write G as dS_0.
The gradient of P_n, G_{n+1} S_n^T = DM[n] S_IN[n]^T, is one batched GEMM afterwards, so no
program reduces over the value blocks (no atomics: the backward is deterministic).

A program's state lives in the buffer it writes anyway (S_IN[n + 1] is computed from S_IN[n],
DM[n - 1] from DM[n]: global memory, hot in L2), read and written in [32, 32] tiles with a
barrier between chunks, so no program holds a [K, K] map or a [K, V] state in registers (held
whole, K = 128 compiled to 21 KB of spills per thread). States and maps are float32 (they sum
the whole prefix); the dots run in IEEE fp32. ``aot_cases`` gives kernels/aot.py these
launches at the presets' shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from plait.kernels.triton_common import check_device, on_device


@triton.jit
def _tile(ptr, offs_r, offs_c, R, C):
    m = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    return tl.load(ptr + offs_r[:, None] * C + offs_c[None, :], mask=m, other=0.0)


@triton.jit
def _put(ptr, x, offs_r, offs_c, R, C):
    m = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    tl.store(ptr + offs_r[:, None] * C + offs_c[None, :], x, mask=m)


@triton.jit
def _scan_fwd(
    P, M, S0, S_IN, S_FINAL, N, K, V,
    HAS_INIT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    bh64 = tl.cast(bh, tl.int64)
    offs_b = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    p_ptr, m_ptr = P + bh64 * N * K * K, M + bh64 * N * K * V
    s_ptr = S_IN + bh64 * N * K * V
    # S_IN[0] = S_0: the state lives in global memory (L2), K rows in blocks of BK
    for i in range(0, K, BK):
        s = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_INIT:
            s = _tile(S0 + bh64 * K * V, i + offs_b, offs_v, K, V)
        _put(s_ptr, s, i + offs_b, offs_v, K, V)
    for n in range(0, N):
        n64 = tl.cast(n, tl.int64)
        tl.debug_barrier()  # S_IN[n], written by every thread, is read whole below
        src = s_ptr + n64 * K * V
        dst = s_ptr + (n64 + 1) * K * V
        if n == N - 1:
            dst = S_FINAL + bh64 * K * V
        for i in range(0, K, BK):
            acc = _tile(m_ptr + n64 * K * V, i + offs_b, offs_v, K, V)
            for j in range(0, K, BK):
                p = _tile(p_ptr + n64 * K * K + i * K, offs_b, j + offs_b, K - i, K)
                s = _tile(src, j + offs_b, offs_v, K, V)
                acc += tl.dot(p, s, input_precision="ieee")
            _put(dst, acc, i + offs_b, offs_v, K, V)


@triton.jit
def _scan_bwd(
    P, DS_IN, DS_FINAL, DM, DS0, N, K, V,
    HAS_DFINAL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    bh64 = tl.cast(bh, tl.int64)
    offs_b = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    p_ptr = P + bh64 * N * K * K
    ds_ptr, dm_ptr = DS_IN + bh64 * N * K * V, DM + bh64 * N * K * V
    last = dm_ptr + tl.cast(N - 1, tl.int64) * K * V
    # DM[N - 1] = dS_final; then DM[n - 1] = P_n^T DM[n] + dS_IN[n], and dS_0 from n = 0
    for i in range(0, K, BK):
        g = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_DFINAL:
            g = _tile(DS_FINAL + bh64 * K * V, i + offs_b, offs_v, K, V)
        _put(last, g, i + offs_b, offs_v, K, V)
    for step in range(0, N):
        n64 = tl.cast(N - 1 - step, tl.int64)
        tl.debug_barrier()  # DM[n], written by every thread, is read whole below
        src = dm_ptr + n64 * K * V
        dst = dm_ptr + (n64 - 1) * K * V
        if step == N - 1:
            dst = DS0 + bh64 * K * V
        for i in range(0, K, BK):
            acc = _tile(ds_ptr + n64 * K * V, i + offs_b, offs_v, K, V)
            for j in range(0, K, BK):
                # (P^T)[i-block, j-block] = P[j-block, i-block]^T
                p = _tile(p_ptr + n64 * K * K + j * K, offs_b, i + offs_b, K - j, K)
                g = _tile(src, j + offs_b, offs_v, K, V)
                acc += tl.dot(tl.trans(p), g, input_precision="ieee")
            _put(dst, acc, i + offs_b, offs_v, K, V)


def plan(K: int, V: int) -> dict:
    """Tiles and warps of one call (shared with the compile test): K in blocks of at most 32
    rows, value blocks of at most 32 columns (64 x 64 fp32 tiles spill)."""
    BK = max(16, min(32, triton.next_power_of_2(K)))
    BV = max(16, min(32, triton.next_power_of_2(V)))
    return dict(BK=BK, BV=BV, num_warps=4)


class _AffineScan(torch.autograd.Function):
    """(P [BH, N, K, K], M [BH, N, K, V], S0 [BH, K, V] or None) -> (the state entering
    every chunk [BH, N, K, V], the final state [BH, K, V]), float32."""

    @staticmethod
    def forward(ctx, P, M, S0):
        BH, N, K, V = M.shape
        meta = plan(K, V)
        P, M = P.float().contiguous(), M.float().contiguous()
        has_init = S0 is not None
        init = S0.float().contiguous() if has_init else M.new_zeros(1)
        S_in = torch.empty_like(M)
        final = M.new_empty(BH, K, V)
        with on_device(M):
            _scan_fwd[(triton.cdiv(V, meta["BV"]), BH)](
                P, M, init, S_in, final, N, K, V, HAS_INIT=has_init, BK=meta["BK"],
                BV=meta["BV"], num_warps=meta["num_warps"], num_stages=1,
            )
        ctx.save_for_backward(P, S_in)
        ctx.has_init = has_init
        return S_in, final

    @staticmethod
    def backward(ctx, d_S_in, d_final):
        P, S_in = ctx.saved_tensors
        BH, N, K, V = S_in.shape
        meta = plan(K, V)
        ds = d_S_in.float().contiguous() if d_S_in is not None else torch.zeros_like(S_in)
        has_df = d_final is not None
        df = d_final.float().contiguous() if has_df else S_in.new_zeros(1)
        dM = torch.empty_like(S_in)
        dS0 = S_in.new_empty(BH, K, V)
        with on_device(S_in):
            _scan_bwd[(triton.cdiv(V, meta["BV"]), BH)](
                P, ds, df, dM, dS0, N, K, V, HAS_DFINAL=has_df, BK=meta["BK"],
                BV=meta["BV"], num_warps=meta["num_warps"], num_stages=1,
            )
        dP = dM @ S_in.transpose(-1, -2)
        return dP, dM, dS0 if ctx.has_init else None


def affine_scan_triton(P, M, S0=None):
    """The chunk scan on the GPU (or the Triton interpreter): P [B, H, N, K, K], M
    [B, H, N, K, V], S0 [B, H, K, V] or None -> (S_in [B, H, N, K, V], final [B, H, K, V])."""
    check_device(P, M, S0, what="gated_delta_rule")
    B, H, N, K, V = M.shape
    S0f = S0.reshape(B * H, K, V) if S0 is not None else None
    S_in, final = _AffineScan.apply(P.reshape(B * H, N, K, K), M.reshape(B * H, N, K, V), S0f)
    return S_in.view(B, H, N, K, V), final.view(B, H, K, V)


def aot_cases(K: int, V: int, has_init: bool):
    """The two launches of a call at this shape, for kernels/aot.py."""
    meta = plan(K, V)
    f32, i32 = "*fp32", "i32"
    ints = dict(N=i32, K=i32, V=i32)
    tiles = dict(BK=meta["BK"], BV=meta["BV"])
    return [
        dict(fn=_scan_fwd, types=dict(P=f32, M=f32, S0=f32, S_IN=f32, S_FINAL=f32, **ints),
             constexprs=dict(HAS_INIT=has_init, **tiles), num_warps=meta["num_warps"],
             num_stages=1),
        dict(fn=_scan_bwd, types=dict(P=f32, DS_IN=f32, DS_FINAL=f32, DM=f32, DS0=f32, **ints),
             constexprs=dict(HAS_DFINAL=has_init, **tiles), num_warps=meta["num_warps"],
             num_stages=1),
    ]
