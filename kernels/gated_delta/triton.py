"""The GPU path of the gated delta rule: the chunked form's sequential part as one Triton
kernel each way, the rest batched PyTorch (cuBLAS GEMMs and one batched triangular solve).

chunk.py reduces every chunk n to an affine map of the state, S_{n+1} = P_n S_n + M_n (P_n
[K, K], M_n [K, V] per head, formed for all chunks at once). What is left sequential is this
scan; run from Python it is N small launches forward and more backward (N = T / 64: 128
chunks at 8K tokens, 1,024 at 64K), so on a GPU it is one program per (value block, head):
  * forward: S <- S_0; for n: write S to S_IN[n]; S <- P_n S + M_n; write S_FINAL.
  * backward: G <- dS_FINAL; for n from the last: write G to DM[n] (the gradient of M_n is
    the gradient of S_{n+1}); G <- P_n^T G + dS_IN[n]; write G as dS_0.
Both are ``_scan``, one kernel with ``REVERSE`` a compile-time flag.
The gradient of P_n, G_{n+1} S_n^T = DM[n] S_IN[n]^T, is one batched GEMM afterwards, so no
program reduces over the value blocks (no atomics: the backward is deterministic).

A program's state lives in the buffer it writes anyway (S_IN[n + 1] is computed from S_IN[n],
DM[n - 1] from DM[n]: global memory, hot in L2), read and written in [32, 32] tiles with a
barrier between chunks, so no program holds a [K, K] map or a [K, V] state in registers (held
whole, K = 128 compiled to 21 KB of spills per thread). States and maps are float32 (they sum
the whole prefix); the dots run in IEEE fp32. kernels/launches.py compiles its launches at
the presets' shapes.
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
def _scan(
    P, BIAS, START, OUT, LAST, N, K, V,
    HAS_START: tl.constexpr, REVERSE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """Forward (REVERSE false): OUT[0] = START, OUT[n + 1] = P_n OUT[n] + BIAS[n], the last
    into LAST. Backward (REVERSE true): OUT[N - 1] = START, OUT[n - 1] = P_n^T OUT[n] +
    BIAS[n], the last (n = 0) into LAST. One program per (value block, head)."""
    pid_v, bh = tl.program_id(0), tl.program_id(1)
    bh64 = tl.cast(bh, tl.int64)
    offs_b = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    p_ptr, b_ptr = P + bh64 * N * K * K, BIAS + bh64 * N * K * V
    o_ptr = OUT + bh64 * N * K * V
    first = N - 1 if REVERSE else 0
    # the recurrence lives in global memory (L2), K rows in blocks of BK
    for i in range(0, K, BK):
        x = tl.zeros((BK, BV), dtype=tl.float32)
        if HAS_START:
            x = _tile(START + bh64 * K * V, i + offs_b, offs_v, K, V)
        _put(o_ptr + tl.cast(first, tl.int64) * K * V, x, i + offs_b, offs_v, K, V)
    for step in range(0, N):
        n64 = tl.cast(N - 1 - step if REVERSE else step, tl.int64)
        tl.debug_barrier()  # OUT[n], written by every thread, is read whole below
        src = o_ptr + n64 * K * V
        dst = o_ptr + (n64 - 1 if REVERSE else n64 + 1) * K * V
        if step == N - 1:
            dst = LAST + bh64 * K * V
        for i in range(0, K, BK):
            acc = _tile(b_ptr + n64 * K * V, i + offs_b, offs_v, K, V)
            for j in range(0, K, BK):
                if REVERSE:  # (P^T)[i-block, j-block] = P[j-block, i-block]^T
                    p = tl.trans(_tile(p_ptr + n64 * K * K + j * K, offs_b, i + offs_b, K - j,
                                       K))
                else:
                    p = _tile(p_ptr + n64 * K * K + i * K, offs_b, j + offs_b, K - i, K)
                x = _tile(src, j + offs_b, offs_v, K, V)
                acc += tl.dot(p, x, input_precision="ieee")
            _put(dst, acc, i + offs_b, offs_v, K, V)


def plan(K: int, V: int) -> dict:
    """Tiles and warps of one call (shared with the compile test): K in blocks of at most 32
    rows, value blocks of at most 32 columns (64 x 64 fp32 tiles spill)."""
    BK = max(16, min(32, triton.next_power_of_2(K)))
    BV = max(16, min(32, triton.next_power_of_2(V)))
    return dict(BK=BK, BV=BV, num_warps=4)


def _launch(P, bias, start, out, last, has_start: bool, reverse: bool) -> None:
    """One ``_scan`` over [BH, N, K, V] (``out`` and ``bias``), one program per value block
    and head."""
    BH, N, K, V = out.shape
    meta = plan(K, V)
    with on_device(out):
        _scan[(triton.cdiv(V, meta["BV"]), BH)](
            P, bias, start, out, last, N, K, V, HAS_START=has_start, REVERSE=reverse,
            BK=meta["BK"], BV=meta["BV"], num_warps=meta["num_warps"], num_stages=1,
        )


class _AffineScan(torch.autograd.Function):
    """(P [BH, N, K, K], M [BH, N, K, V], S0 [BH, K, V] or None) -> (the state entering
    every chunk [BH, N, K, V], the final state [BH, K, V]), float32."""

    @staticmethod
    def forward(ctx, P, M, S0):
        BH, N, K, V = M.shape
        P, M = P.float().contiguous(), M.float().contiguous()
        has_init = S0 is not None
        init = S0.float().contiguous() if has_init else M.new_zeros(1)
        S_in = torch.empty_like(M)
        final = M.new_empty(BH, K, V)
        _launch(P, M, init, S_in, final, has_init, reverse=False)
        ctx.save_for_backward(P, S_in)
        ctx.has_init = has_init
        return S_in, final

    @staticmethod
    def backward(ctx, d_S_in, d_final):
        P, S_in = ctx.saved_tensors
        BH, N, K, V = S_in.shape
        ds = d_S_in.float().contiguous() if d_S_in is not None else torch.zeros_like(S_in)
        has_df = d_final is not None
        df = d_final.float().contiguous() if has_df else S_in.new_zeros(1)
        dM = torch.empty_like(S_in)
        dS0 = S_in.new_empty(BH, K, V)
        _launch(P, ds, df, dM, dS0, has_df, reverse=True)
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
