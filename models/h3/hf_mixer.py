"""Letter H of a plait export: H3 (a shift SSM on k, a diagonal SSM on k v^T,
multiplicative gates), the HF-side module of models/h3/mixer.py.

Plain PyTorch, importing nothing from plait: copied into an export by
``python -m plait.launcher.export`` (models/common/hf_code.py assembles the files).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .plait_layers import wide


def _fft_causal_conv(u_BT_: torch.Tensor, k_L_: torch.Tensor) -> torch.Tensor:
    """y[:, t] = sum_{j <= t} k[t - j] u[:, j] along dim 1 of u (dim 0 of k; the trailing
    dims broadcast), by FFT over 2T points (no wrap-around for lags < T)."""
    T = u_BT_.shape[1]
    k = k_L_[:T]  # longer lags never reach these T outputs (and would wrap around)
    U = torch.fft.rfft(u_BT_, n=2 * T, dim=1)
    K = torch.fft.rfft(k, n=2 * T, dim=0)
    return torch.fft.irfft(U * K[None], n=2 * T, dim=1)[:, :T]


def _power_tables(z_HS: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z^l for l < L as two small tables, z^l = high[..., l // n] * low[..., l % n] with
    n = ceil(sqrt(L)): about 2 sqrt(L) complex exponentials per mode instead of L, and no
    [heads, N/2, L] tensor (a 1.3B layer at 2048 tokens: 2048 x 32 x 2048 complex)."""
    n = math.isqrt(max(L, 1) - 1) + 1
    m = -(-L // n)
    log_z = z_HS.log()  # any branch: only integer powers are taken
    l = torch.arange(max(n, m), device=z_HS.device, dtype=log_z.real.dtype)
    low = torch.exp(log_z[..., None] * l[:n])  # [H, S, n]
    high = torch.exp(log_z[..., None] * (n * l[:m]))  # [H, S, m]
    return low, high


class _Kernel(nn.Module):
    """A holder named like the release's ``SSKernel``, whose ``kernel`` is the actual one
    (so the parameters are ``kernel.kernel.*`` and ``ssm_k_kernel.kernel.*``)."""

    def __init__(self, kernel: nn.Module):
        super().__init__()
        self.kernel = kernel


class H3ShiftKernel(nn.Module):
    """The shift SSM (the release's ``SSKernelShift``): A shifts the state down by one,
    so the state is the last N inputs and the kernel is finite, N taps,
    K[l] = sum_n B[n] C[n + l] (the cross-correlation of B and C; B = e_1 gives K = C).
    B [d, N], C [1, d, N]: one kernel per channel."""

    def __init__(self, channels: int, N: int):
        super().__init__()
        self.B = nn.Parameter(torch.zeros(channels, N).index_fill_(1, torch.tensor([0]), 1.0))
        bound = 1 / math.sqrt(N)
        self.C = nn.Parameter(torch.empty(1, channels, N).uniform_(-bound, bound))

    def forward(self) -> torch.Tensor:
        """The taps [d, N] in float32 (lag 0 first)."""
        B, C = wide(self.B), wide(self.C[0])
        N = C.shape[1]
        windows = nn.functional.pad(C, (0, N - 1)).unfold(1, N, 1)  # [d, lag, n] = C[n + lag]
        return torch.einsum("dn,dln->dl", B, windows)


class H3DiagKernel(nn.Module):
    """The diagonal SSM (the release's ``SSKernelDiag``, S4D-Lin): per head, N/2 complex
    modes A = -exp(inv_A_real) + i A_imag (their conjugates are implied: the output is
    2 Re of the sum), step dt = exp(log_dt), B and C complex (stored as real pairs),
    discretised by

        bilinear:  A_bar = (1 + dt A / 2) / (1 - dt A / 2),  B_bar = dt B / (1 - dt A / 2)
        zoh:       A_bar = exp(dt A),                       B_bar = (exp(dt A) - 1) / A * B

    so that x_t = A_bar x_{t-1} + B_bar u_t, y_t = 2 Re(C . x_t), and as a convolution
    K[l] = 2 Re(sum_s C_s B_bar_s A_bar_s^l)."""

    def __init__(self, heads: int, N: int, discretisation: str):
        super().__init__()
        S = N // 2
        self.discretisation = discretisation
        self.log_dt = nn.Parameter(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.inv_A_real = nn.Parameter(torch.full((heads, S), math.log(0.5)))
        self.A_imag = nn.Parameter(
            (math.pi * torch.arange(S, dtype=torch.float32)).repeat(heads, 1)
        )
        self.B = nn.Parameter(torch.stack([torch.ones(heads, S), torch.zeros(heads, S)], -1))
        self.C = nn.Parameter(torch.randn(1, heads, S, 2) * math.sqrt(0.5))

    def discretised(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A_bar, B_bar, C), complex [heads, N/2], in float32 (complex64)."""
        dt = wide(self.log_dt).exp()[:, None]
        A = torch.complex(-wide(self.inv_A_real).exp(), wide(self.A_imag))
        B = torch.view_as_complex(wide(self.B).contiguous())
        C = torch.view_as_complex(wide(self.C[0]).contiguous())
        dtA = dt * A
        if self.discretisation == "zoh":
            return torch.exp(dtA), (torch.exp(dtA) - 1) / A * B, C
        if self.discretisation == "bilinear":
            return (1 + dtA / 2) / (1 - dtA / 2), dt / (1 - dtA / 2) * B, C
        raise ValueError(f"h3.discretisation: {self.discretisation!r} is not bilinear or zoh")

    def forward(self, L: int) -> torch.Tensor:
        """The convolution kernel [heads, L] (real, float32)."""
        A_bar, B_bar, C = self.discretised()
        low, high = _power_tables(A_bar, L)
        K = torch.einsum("hsa,hsb->hab", (C * B_bar)[..., None] * high, low)
        return 2 * K.flatten(1)[:, :L].real


class H3Mixer(nn.Module):
    """Letter H, the H3 layer (HazyResearch/H3's ``H3``):

        q, k, v = q_proj(x), k_proj(x), v_proj(x)          heads of ``head_dim`` channels
        k  = ShiftSSM(k) + ssm_k_D * k                     (a learned N-tap FIR per channel)
        kv = k v^T per head, [heads, d(k), d(v)]           (k * v at head_dim 1)
        y  = DiagSSM(kv) + D * kv                          (one S4D kernel per head)
        out = output_linear(sum over d(k) of q * y)        (channels ordered (d(v) heads))

    The shift SSM remembers the last few tokens, the diagonal SSM carries them far, and the
    q gate reads them out (associative recall). Everything after the projections runs in
    float32, as the release does.

    The full sequence is two FFT convolutions with the SSMs' kernels. Decoding keeps

      * ``k_tail`` [B, N - 1, hidden]: the last N - 1 inputs of the shift SSM (zeros before
        the sequence): its kernel has N taps, so no older k reaches a new output;
      * ``ssm`` [B, heads, d, d, N/2] complex: the diagonal SSM's state
        x = sum_j A_bar^(t - j) B_bar kv_j, which is all the infinite kernel needs of the
        past (x_t = A_bar x_{t-1} + B_bar kv_t, y_t = 2 Re(C . x_t));

    and steps both recurrences one token at a time. Left padding: k and v are zeroed there
    (their biases would make them nonzero), so a pad enters neither convolution nor state.
    """

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h, opts = config.hidden_size, config.options("h3")
        self.N = opts.get("state_size", 64)
        self.head_dim = opts.get("head_dim", 1)
        self.heads = h // self.head_dim
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.output_linear = nn.Linear(h, h)
        self.ssm_k_kernel = _Kernel(H3ShiftKernel(h, self.N))
        self.ssm_k_D = nn.Parameter(torch.randn(h))
        self.kernel = _Kernel(
            H3DiagKernel(self.heads, self.N, opts.get("discretisation", "bilinear"))
        )
        self.D = nn.Parameter(torch.randn(self.heads))

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, _ = x_BTC.shape
        q, k, v = wide(self.q_proj(x_BTC)), wide(self.k_proj(x_BTC)), wide(self.v_proj(x_BTC))
        if pad_BT is not None:
            real = (~pad_BT).to(k.dtype)[..., None]
            k, v = k * real, v * real
        if state is None:
            y, state = self._sequence(q, k, v)
        else:  # token by token (the SSMs' parameters discretised once)
            shift, ssm = self.ssm_k_kernel.kernel(), self.kernel.kernel.discretised()
            ys = []
            for t in range(T):
                y_t, state = self._step(q[:, t], k[:, t], v[:, t], state, shift, ssm)
                ys.append(y_t)
            y = torch.stack(ys, 1)
        return self.output_linear(y.to(x_BTC.dtype)), state

    def _readout(self, q_BHd: torch.Tensor, y_BHdd: torch.Tensor) -> torch.Tensor:
        """sum over d(k) of q * y, channels ordered (d(v) heads) as the release's Python path."""
        y = (q_BHd[..., None] * y_BHdd).sum(-2)  # [..., heads, d(v)]
        return y.transpose(-1, -2).flatten(-2)

    def _sequence(self, q, k, v) -> tuple[torch.Tensor, dict]:
        """The whole sequence from the start by FFT convolutions, and the state after it."""
        B, T, _ = q.shape
        H, d, N = self.heads, self.head_dim, self.N
        k_tail = torch.cat((k.new_zeros(B, N - 1, k.shape[2]), k), 1)[:, T:]
        shift = self.ssm_k_kernel.kernel()  # [hidden, N]
        k = _fft_causal_conv(k, shift.t()) + wide(self.ssm_k_D) * k
        kv = k.view(B, T, H, d, 1) * v.view(B, T, H, 1, d)
        ssm_kernel = self.kernel.kernel(T)  # [heads, T]
        y = _fft_causal_conv(kv, ssm_kernel.t()[:, :, None, None])
        y = y + wide(self.D)[:, None, None] * kv
        return self._readout(q.view(B, T, H, d), y), {"k_tail": k_tail, "ssm": self._state(kv)}

    def _state(self, kv_BTHdd: torch.Tensor) -> torch.Tensor:
        """The diagonal SSM's state after the sequence, sum_j A_bar^(T-1-j) B_bar kv_j."""
        A_bar, B_bar, _ = self.kernel.kernel.discretised()
        B, T = kv_BTHdd.shape[:2]
        low, high = _power_tables(A_bar, T)
        n, m = low.shape[-1], high.shape[-1]
        # u[r] = kv[T - 1 - r] (r = the power of A_bar it gets), r = n a + b
        u = nn.functional.pad(kv_BTHdd.flip(1), (0, 0, 0, 0, 0, 0, 0, n * m - T))
        u = u.view(B, m, n, *kv_BTHdd.shape[2:]).to(low.dtype)
        inner = torch.einsum("hsb,zabhxy->zahxys", low, u)
        return torch.einsum("hsa,zahxys->zhxys", high, inner) * B_bar[:, None, None]

    def _step(self, q_BC, k_BC, v_BC, state: dict, shift, ssm) -> tuple[torch.Tensor, dict]:
        """One token through both recurrences (``shift``: the shift SSM's taps [hidden, N],
        lag 0 first; ``ssm``: the diagonal SSM's (A_bar, B_bar, C))."""
        B = q_BC.shape[0]
        H, d = self.heads, self.head_dim
        window = torch.cat((state["k_tail"], k_BC[:, None]), 1)  # [B, N, hidden], oldest first
        k = torch.einsum("bnc,cn->bc", window, shift.flip(1)) + wide(self.ssm_k_D) * k_BC
        kv = k.view(B, H, d, 1) * v_BC.view(B, H, 1, d)
        A_bar, B_bar, C = ssm
        x = A_bar[:, None, None] * state["ssm"] + B_bar[:, None, None] * kv[..., None]
        y = 2 * (C[:, None, None] * x).sum(-1).real + wide(self.D)[:, None, None] * kv
        return self._readout(q_BC.view(B, H, d), y), {"k_tail": window[:, 1:], "ssm": x}
