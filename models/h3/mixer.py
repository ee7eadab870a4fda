"""The H3 layer, letter ``H``.

    q, k, v = W_q x, W_k x, W_v x                       (heads of ``h3.head_dim`` channels)
    k <- ShiftSSM(k) + D_k * k                          (a learned FIR of ``state_size`` taps
                                                         and a skip, one per channel)
    kv = k v^T per head  (k * v when head_dim = 1)
    y  = DiagSSM(kv) + D * kv                           (S4D, complex diagonal A)
    out = W_o (q^T y)

The shift SSM remembers recent tokens (like a short conv), the diagonal SSM carries them far;
the q gate reads them out, which is how H3 does associative recall. One SSM kernel per head,
shared by the head's head_dim^2 channels (the released code's ``H = d_model / head_dim``);
one shift kernel and one skip D_k per channel of k, whatever head_dim (as released).

Parameterisation (S4D-Lin, as HazyResearch/H3's SSKernelDiag): A = -exp(A_real_log) +
i A_imag with A_real_log = log 0.5 and A_imag = pi n at init; log_dt ~ U(log 1e-3, log 1e-1);
complex C ~ N(0, 1/2) per part; discretised bilinearly by default (``h3.discretisation``).
The shift SSM's taps start as the released Conv1d-style init, U(+-1/sqrt(N)). dt and A are
the SSM's dynamics: they train at min(h3.ssm_lr_cap, lr) without weight decay (attributes
``_lr_cap``/``_no_weight_decay`` read by the optimizer's parameter groups), as the
reference's ``register(..., lr)`` does; C, D and the projections train like every other
weight. The output projection is initialised N(0, init_std) without the depth scaling other
residual-writing layers get: the released init rescales only layers named ``out_proj`` or
``fc2``, and H3's is ``output_linear``.

Deliberate differences from the release (docs/models.md): the released layer has trainable
B vectors in both SSMs (diag B [H, N/2] complex, init 1; shift B [d, N], init e_1); the
kernels depend only on the products C * B (diag) and the cross-correlation B * C (shift), so
plait keeps the folded C alone (same function, fewer parameters; the HF export writes
B = 1 / e_1 and folds a released B into C on import). With head_dim > 1 the released Python
path orders the readout's channels (d h) and its fused CUDA path (h d); plait computes (h d),
which keeps a TP rank's channels contiguous, and the export permutes out_proj's columns to
the Python path's (d h).
"""

from __future__ import annotations

import math

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from plait.kernels.longconv import diag_ssm_kernel, discretise, long_conv, shift_ssm_kernel
from plait.models.common.config import ModelConfig, ModelConfigError
from plait.models.common.layers import local_heads, normal_init
from plait.parallel import convs
from plait.parallel.sequence import SequenceParallel
from plait.parallel.tensor_parallel import mark_tp_sharded


def _sharded(full: torch.Tensor, first: int, n: int) -> nn.Parameter:
    return mark_tp_sharded(nn.Parameter(full[first : first + n].clone()), 0)


class H3(nn.Module):
    def __init__(
        self, cfg: ModelConfig, mp: ModelParallelConfig, layer_idx: int, sp: SequenceParallel
    ):
        super().__init__()
        h, o = cfg.hidden_size, cfg.h3
        if h % o.head_dim:
            raise ModelConfigError(f"h3.head_dim: hidden_size {h} is not divisible by {o.head_dim}")
        heads = h // o.head_dim
        self.dh = o.head_dim
        self.heads, first = local_heads(heads, "h3.head_dim (hidden_size / head_dim heads)")
        common = dict(config=mp, bias=True, gather_output=False)
        init = normal_init(cfg.init_std)
        self.q_proj = ColumnParallelLinear(h, h, init_method=init, **common)
        self.k_proj = ColumnParallelLinear(h, h, init_method=init, **common)
        self.v_proj = ColumnParallelLinear(h, h, init_method=init, **common)
        self.out_proj = RowParallelLinear(
            h, h, config=mp, bias=True, input_is_parallel=True, skip_bias_add=False,
            init_method=init,
        )
        N, S = o.state_size, o.state_size // 2
        n = self.heads
        # Drawn whole, in a fixed order, then sliced: same logical init at every TP size.
        shift_C = torch.empty(h, N).uniform_(-1 / math.sqrt(N), 1 / math.sqrt(N))
        shift_D = torch.randn(h)
        log_dt = torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1))
        A_real_log = torch.full((heads, S), math.log(0.5))
        A_imag = (math.pi * torch.arange(S, dtype=torch.float32)).expand(heads, S)
        C = torch.randn(heads, S, 2) * math.sqrt(0.5)
        D = torch.randn(heads)
        d = o.head_dim  # the shift SSM is per channel: this rank's heads' channels
        self.shift_C = _sharded(shift_C, first * d, n * d)
        self.shift_D = _sharded(shift_D, first * d, n * d)
        self.log_dt = _sharded(log_dt, first, n)
        self.A_real_log = _sharded(A_real_log, first, n)
        self.A_imag = _sharded(A_imag, first, n)
        self.C = _sharded(C, first, n)
        self.D = _sharded(D, first, n)
        for p in (self.log_dt, self.A_real_log, self.A_imag):
            p._lr_cap = o.ssm_lr_cap
            p._no_weight_decay = True
        self.sp = sp
        self.discretisation = o.discretisation

    @staticmethod
    def param_count(cfg: ModelConfig, layer_idx: int) -> int:
        h, N = cfg.hidden_size, cfg.h3.state_size
        heads = h // cfg.h3.head_dim
        return 4 * h * h + 4 * h + h * (N + 1) + heads * (2 * N + 2)

    @staticmethod
    def tp_split(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
        heads = cfg.hidden_size // cfg.h3.head_dim
        return {"model.h3.head_dim: hidden_size / head_dim heads": heads}

    @staticmethod
    def halo(cfg: ModelConfig, layer_idx: int) -> tuple[str, int]:
        return "", 0  # the shift SSM takes a halo when it fits, else the gathered prefix

    def ssm_A_C(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The diagonal SSM's complex A and C, [heads_local, N/2], in float32."""
        A = torch.complex(-self.A_real_log.float().exp(), self.A_imag.float())
        return A, torch.view_as_complex(self.C.float().contiguous())

    def shift_kernel(self, L: int) -> torch.Tensor:
        """The shift SSM's kernel [channels_local, min(L, N)] in float32, with the D_k skip
        as its lag 0."""
        shift = shift_ssm_kernel(self.shift_C.float(), min(L, self.shift_C.shape[1])).clone()
        shift[:, 0] = shift[:, 0] + self.shift_D.float()
        return shift

    def forward(self, x_BTC, positions_BT, doc_ids_BT=None):
        q, _ = self.q_proj(x_BTC)
        k, _ = self.k_proj(x_BTC)
        v, _ = self.v_proj(x_BTC)
        B, T, _ = q.shape
        H, d = self.heads, self.dh
        shift = self.shift_kernel(T)
        # From here on float32, as the released layer (both convolutions, k v^T and q^T y):
        # the SSM state sums many lags, and bf16 products would round before the sum.
        k = convs.long_conv(self.sp, k.float(), shift, doc_ids_BT)
        kv = (k.view(B, T, H, d, 1) * v.float().view(B, T, H, 1, d)).reshape(B, T, H * d * d)
        A, C = self.ssm_A_C()
        rep = d * d
        y = convs.diag_ssm(
            self.sp,
            kv,
            self.log_dt.float().repeat_interleave(rep, 0),
            A.repeat_interleave(rep, 0),
            C.repeat_interleave(rep, 0),
            doc_ids_BT,
            method=self.discretisation,
        )
        y = y + kv * self.D.float().repeat_interleave(rep, 0)
        y = (q.float().view(B, T, H, d, 1) * y.view(B, T, H, d, d)).sum(3).reshape(B, T, H * d)
        out, _ = self.out_proj(y.to(q.dtype))
        return out

    def decode(
        self, x_BTC: torch.Tensor, positions_BT: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        """Decode form (family.py's contract). The state, this rank's channels, float32:

        * ``k_tail`` [B, N - 1, channels]: the last N - 1 inputs of the shift SSM (k before
          it; zeros before the sequence). Its kernel has N taps, so no older k reaches a new
          output.
        * ``ssm`` [B, heads * head_dim^2, N / 2] complex: the diagonal SSM's state
          x = sum_j A_bar^(t - j) B_bar kv_j. Its kernel is C A_bar^l B_bar, so every lag
          beyond the new tokens factorises through x: the past adds 2 Re(C A_bar^(i + 1) x)
          to the new token i, and x moves on as A_bar^T x + the new tokens' own sum.

        T tokens at once, as plait's sequence parallelism passes a chunk boundary
        (parallel/convs.py): the shift SSM convolves [k_tail, k] (a halo), the diagonal SSM
        convolves the new tokens from zero (forward's FFT path, so a prefill is forward) and
        adds the carried state's term.
        """
        q, _ = self.q_proj(x_BTC)
        k, _ = self.k_proj(x_BTC)
        v, _ = self.v_proj(x_BTC)
        B, T, _ = q.shape
        H, d, N = self.heads, self.dh, self.shift_C.shape[1]
        k = k.float()
        tail = k.new_zeros(B, N - 1, k.shape[2]) if state is None else state["k_tail"]
        k_ext = torch.cat((tail, k), 1)
        k = long_conv(k_ext, self.shift_kernel(N))[:, N - 1 :]
        rep = d * d
        kv = (k.view(B, T, H, d, 1) * v.float().view(B, T, H, 1, d)).reshape(B, T, H, rep)
        A, C = self.ssm_A_C()
        log_dt = self.log_dt.float()
        kernel = diag_ssm_kernel(log_dt, A, C, T, self.discretisation).repeat_interleave(rep, 0)
        y = long_conv(kv.reshape(B, T, H * rep), kernel).view(B, T, H, rep)
        log_A_bar, B_bar = discretise(log_dt, A, self.discretisation)  # [H, N/2] each
        x = torch.zeros(B, H, rep, N // 2, dtype=A.dtype, device=k.device)
        if state is not None:
            x = state["ssm"].view(B, H, rep, N // 2)
            y = y + _carried(x, C, log_A_bar, T)
        x = x * torch.exp(log_A_bar * T)[None, :, None] + _own_state(kv, log_A_bar, B_bar)
        y = y + kv * self.D.float()[:, None]
        y = (q.float().view(B, T, H, d, 1) * y.view(B, T, H, d, d)).sum(3).reshape(B, T, H * d)
        out, _ = self.out_proj(y.to(q.dtype))
        new = {"k_tail": k_ext[:, -(N - 1) :], "ssm": x.reshape(B, H * rep, N // 2)}
        return out, new


_DECODE_CHUNK = 256
"""Tokens per block of the [heads, N/2, tokens] powers of A_bar in the decode state updates
(bounds their memory in a long prefill, as ``vandermonde`` does for the kernel)."""


def _carried(x_BHRS, C_HS, log_A_bar_HS, T: int) -> torch.Tensor:
    """[B, T, H, R]: what the carried state adds to the T new tokens, 2 Re(C A_bar^(i+1) x)."""
    parts = []
    for start in range(0, T, _DECODE_CHUNK):
        i = torch.arange(start, min(T, start + _DECODE_CHUNK), device=C_HS.device)
        decay = torch.exp(log_A_bar_HS[..., None] * (i + 1).to(log_A_bar_HS.real.dtype))
        parts.append(2 * torch.einsum("hs,hst,bhrs->bthr", C_HS, decay, x_BHRS).real)
    return torch.cat(parts, 1)


def _own_state(kv_BTHR, log_A_bar_HS, B_bar_HS) -> torch.Tensor:
    """[B, H, R, S]: the diagonal SSM's state after the T tokens from zero,
    sum_j A_bar^(T-1-j) B_bar kv_j."""
    T = kv_BTHR.shape[1]
    x = 0
    for start in range(0, T, _DECODE_CHUNK):
        j = torch.arange(start, min(T, start + _DECODE_CHUNK), device=kv_BTHR.device)
        w = torch.exp(log_A_bar_HS[..., None] * (T - 1 - j).to(log_A_bar_HS.real.dtype))
        u = kv_BTHR[:, start : start + _DECODE_CHUNK].to(w.dtype)
        x = x + torch.einsum("hst,bthr->bhrs", w, u)
    return x * B_bar_HS[None, :, None]
