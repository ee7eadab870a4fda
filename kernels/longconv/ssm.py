"""The SSM convolution kernels of H3, and their recurrences.

H3 applies two state-space models as long convolutions (Fu et al., 2023):
  * the shift SSM: A is the shift matrix and B = e_1, so the state is the last N inputs and
    the kernel is just the learned C, k[n] = C[n] for n < N and 0 after;
  * the diagonal SSM (S4D): diagonal complex A (in conjugate pairs, of which N/2 are kept),
    B = 1, discretised with step dt by
        bilinear (H3's released kernel, its default):
            A_bar = (1 + dt A / 2) / (1 - dt A / 2),  B_bar = dt / (1 - dt A / 2);
        zero-order hold (S4D's paper, ``discretisation="zoh"``):
            A_bar = exp(dt A),  B_bar = (exp(dt A) - 1) / A;
        x_t = A_bar x_{t-1} + B_bar u_t,  y_t = 2 Re(C . x_t),
    whose convolution kernel is k[l] = 2 Re(sum_s C_s B_bar_s A_bar_s^l).
The kernels feed ``long_conv`` (FFT); the recurrences are the step forms for generation and
the references the FFT path is tested against. The parameterisation (how A, C, dt are stored
and initialised) belongs to the H3 model family.
"""

from __future__ import annotations

from typing import Literal

import torch

Discretisation = Literal["bilinear", "zoh"]


def shift_ssm_kernel(C_CN: torch.Tensor, L: int) -> torch.Tensor:
    """[C, N] -> [C, L]: the shift SSM's kernel is its C, zero beyond the state size."""
    N = C_CN.shape[1]
    if N >= L:
        return C_CN[:, :L]
    return torch.nn.functional.pad(C_CN, (0, L - N))


def discretise(log_dt_C: torch.Tensor, A_CS: torch.Tensor, method: Discretisation = "bilinear"):
    """(log A_bar, B_bar), both [C, S] complex: the powers A_bar^l are exp(l log A_bar), which
    the Vandermonde product and the state passing need; any branch of the log gives the same
    integer powers."""
    dt = log_dt_C.exp().to(A_CS.real.dtype)[:, None]
    dtA = dt * A_CS
    if method == "zoh":
        return dtA, (torch.exp(dtA) - 1) / A_CS
    if method == "bilinear":
        return torch.log(1 + dtA / 2) - torch.log(1 - dtA / 2), dt / (1 - dtA / 2)
    raise ValueError(f"h3.discretisation: {method!r} is not 'bilinear' or 'zoh'")


def _vandermonde_chunk(w_CS, logz_CS, start: int, n: int) -> torch.Tensor:
    l = torch.arange(start, start + n, device=logz_CS.device, dtype=logz_CS.real.dtype)
    return torch.einsum("cs,csl->cl", w_CS, torch.exp(logz_CS[..., None] * l))


def vandermonde(w_CS: torch.Tensor, logz_CS: torch.Tensor, L: int, chunk: int = 256):
    """k[c, l] = sum_s w[c, s] z[c, s]^l for l < L, z = exp(logz), real or complex.

    The [C, S, L] tensor of powers is the memory hog (an H3-1.3B layer at 2K tokens: 2048
    channels x 32 x 2048 complex = 1 GB, saved for backward in every layer), so the powers
    are built ``chunk`` lags at a time under activation checkpointing: only the [C, L] result
    is kept and each chunk's powers are recomputed in backward. Same values and gradients
    as the one-shot einsum (tested).
    """
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and (w_CS.requires_grad or logz_CS.requires_grad)
    parts = []
    for start in range(0, L, chunk):
        n = min(chunk, L - start)
        if grad and L > chunk:
            parts.append(
                checkpoint(_vandermonde_chunk, w_CS, logz_CS, start, n, use_reentrant=False)
            )
        else:
            parts.append(_vandermonde_chunk(w_CS, logz_CS, start, n))
    return torch.cat(parts, dim=-1)


def diag_ssm_kernel(
    log_dt_C: torch.Tensor,
    A_CS: torch.Tensor,
    C_CS: torch.Tensor,
    L: int,
    method: Discretisation = "bilinear",
) -> torch.Tensor:
    """S4D kernel [C, L] from log step sizes [C], complex A and C [C, N/2]:
    k[l] = 2 Re(sum_s (C B_bar)_s A_bar_s^l)."""
    log_A_bar, B_bar = discretise(log_dt_C, A_CS, method)
    return 2 * vandermonde(C_CS * B_bar, log_A_bar, L).real


def diag_ssm_step(
    u_BC: torch.Tensor,
    log_dt_C: torch.Tensor,
    A_CS: torch.Tensor,
    C_CS: torch.Tensor,
    state_BCS: torch.Tensor | None = None,
    method: Discretisation = "bilinear",
):
    """One token of the diagonal SSM: returns (y [B, C], complex state [B, C, S])."""
    log_A_bar, B_bar = discretise(log_dt_C, A_CS, method)
    A_bar = torch.exp(log_A_bar)
    if state_BCS is None:
        state_BCS = torch.zeros(u_BC.shape[0], *A_CS.shape, dtype=A_CS.dtype, device=u_BC.device)
    x = A_bar[None] * state_BCS + B_bar[None] * u_BC.to(A_CS.real.dtype)[..., None]
    y = 2 * (x * C_CS[None]).sum(-1).real
    return y.to(u_BC.dtype), x


def shift_ssm_step(u_BC: torch.Tensor, C_CN: torch.Tensor, state_BCN: torch.Tensor | None = None):
    """One token of the shift SSM: the state is the last N inputs, newest first."""
    if state_BCN is None:
        state_BCN = u_BC.new_zeros(*u_BC.shape, C_CN.shape[1])
    x = torch.cat([u_BC[..., None], state_BCN[..., :-1]], dim=-1)
    return (x * C_CN[None]).sum(-1), x
