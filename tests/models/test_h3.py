"""H3's layer against a token-by-token recurrence written from the equations, and its SSM
parameters' learning-rate cap and weight-decay exemption in the optimizer's groups."""

import pytest
import torch
from megatron.core import ModelParallelConfig

from plait.kernels.longconv import diag_ssm_step
from plait.launcher.config import Config
from plait.launcher.engine import build_optimizer
from plait.models.common import ModelConfig, build_model
from plait.models.h3.mixer import H3
from plait.models.presets import apply_preset
from plait.parallel.mpu import MegatronMpu
from plait.parallel.sequence import SequenceParallel
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

T, HID = 23, 16


def recurrence(m: H3, x):
    """k <- shift(k) + D_k k; kv = k v^T per head; y = diag SSM(kv) + D kv; out = W_o(q^T y)."""
    q, k, v = m.q_proj(x)[0], m.k_proj(x)[0], m.v_proj(x)[0]
    B, H, d = x.shape[0], m.heads, m.dh
    N = m.shift_C.shape[1]
    ks = torch.zeros_like(k)
    for t in range(T):
        for n in range(min(N, t + 1)):
            ks[:, t] += m.shift_C[:, n] * k[:, t - n]  # one shift kernel per channel
        ks[:, t] += m.shift_D * k[:, t]
    kv = (ks.view(B, T, H, d, 1) * v.view(B, T, H, 1, d)).reshape(B, T, H * d * d)
    A, C = m.ssm_A_C()
    rep = d * d
    log_dt, A, C = (p.repeat_interleave(rep, 0) for p in (m.log_dt.float(), A, C))
    state, ys = None, []
    for t in range(T):
        y, state = diag_ssm_step(kv[:, t], log_dt, A, C, state, m.discretisation)
        ys.append(y + m.D.repeat_interleave(rep) * kv[:, t])
    y = torch.stack(ys, 1).view(B, T, H, d, d)
    out = (q.view(B, T, H, d, 1) * y).sum(3).reshape(B, T, H * d)
    return m.out_proj(out)[0]


def _compare(rt, head_dim, seed, method):
    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="H", num_layers=1, hidden_size=HID, num_heads=2)
    cfg.h3.head_dim, cfg.h3.state_size, cfg.h3.discretisation = head_dim, 8, method
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = H3(cfg, mp, 0, SequenceParallel())
    x = torch.randn(2, T, HID)
    out = []
    for fn in (lambda xi: m(xi, None), lambda xi: recurrence(m, xi)):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out.append(
            (y.detach(), xi.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters()})
        )
    return out


@pytest.mark.parametrize("head_dim", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_h3_layer_matches_recurrence(head_dim, seed, method):
    """The recurrence's step form follows h3.discretisation (bilinear by default, as the
    released S4D kernel; its closed form is pinned in tests/kernels/test_convs.py)."""
    fast, ref = run_distributed(_compare, 1, head_dim, seed, method)[0]
    assert_rel_close(fast[0], ref[0], 1e-5, "output")
    assert_rel_close(fast[1], ref[1], 1e-5, "dx")
    for k, g in ref[2].items():
        assert_rel_close(fast[2][k], g, 1e-4, k)  # dt/A grads sum long FFT products


def _groups(rt, lr):
    cfg = Config()
    apply_preset(cfg.model, "h3-tiny")
    cfg.optimizer.lr = lr
    model = build_model(cfg.model, 1, vocab_size=64)
    opt = build_optimizer(model, cfg, MegatronMpu())
    return [(n, g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["names"]]


@pytest.mark.parametrize("lr", [1e-2, 1e-4])
def test_ssm_parameters_get_capped_lr_and_no_weight_decay(lr):
    groups = run_distributed(_groups, 1, lr)[0]
    ssm = [g for g in groups if g[0].rsplit(".", 1)[-1] in ("log_dt", "A_real_log", "A_imag")]
    other = [g for g in groups if g not in ssm]
    assert len(ssm) == 3 * 3  # three H layers in h3-tiny
    for name, glr, wd in ssm:
        assert glr == min(1e-3, lr) and wd == 0.0, name
    assert all(glr == lr for _, glr, _ in other)
    assert any(wd > 0 for _, _, wd in other)


def released_h3(t: dict, x, H: int, d: int):
    """The released H3 layer (HazyResearch/H3 src/models/sequence/h3.py, Python path,
    SSKernelDiag with disc='bilinear' and SSKernelShift), written here from its formulas over
    the released tensor layout: k[l] = sum_n B[n] C[n + l] for the shift SSM, K[l] =
    2 Re sum_n C_n B_n dt / (1 - dt A_n / 2) Abar_n^l with Abar = (1 + dt A/2) / (1 - dt A/2),
    readout channels (d h). Float64, direct sums (no FFT)."""
    x = x.double()
    T = x.shape[1]

    def lin(name, u):
        return u @ t[f"{name}.weight"].double().t() + t[f"{name}.bias"].double()

    q, k, v = lin("q_proj", x), lin("k_proj", x), lin("v_proj", x)
    Bs, Cs = t["ssm_k_kernel.kernel.B"].double(), t["ssm_k_kernel.kernel.C"][0].double()
    N = Cs.shape[1]
    shift = torch.stack([(Bs[:, : N - lag] * Cs[:, lag:]).sum(1) for lag in range(N)], 1)
    ks = torch.zeros_like(k)
    for lag in range(min(N, T)):
        ks[:, lag:] += shift[:, lag] * k[:, : T - lag]
    k = ks + t["ssm_k_D"].double() * k
    dt = t["kernel.kernel.log_dt"].double().exp()[:, None]
    A = torch.complex(
        -t["kernel.kernel.inv_A_real"].double().exp(), t["kernel.kernel.A_imag"].double()
    )
    Bd = torch.view_as_complex(t["kernel.kernel.B"].double().contiguous())
    Cd = torch.view_as_complex(t["kernel.kernel.C"][0].double().contiguous())
    Ct = Cd * Bd * dt / (1 - dt * A / 2)
    Abar = (1 + dt * A / 2) / (1 - dt * A / 2)
    lags = torch.arange(T, dtype=torch.float64)
    K = 2 * (Ct[..., None] * Abar[..., None] ** lags).sum(1).real  # [H, T]
    Bt = x.shape[0]
    kv = k.view(Bt, T, H, d, 1) * v.view(Bt, T, H, 1, d)  # [B, T, H, d1, d2]
    y = torch.zeros_like(kv)
    for lag in range(T):
        y[:, lag:] += K[:, lag, None, None] * kv[:, : T - lag]
    y = y + t["D"].double()[:, None, None] * kv
    out = (q.view(Bt, T, H, d, 1) * y).sum(3)  # [B, T, H, d2]
    out = out.transpose(2, 3).reshape(Bt, T, H * d)  # released Python path: (d h)
    return lin("output_linear", out)


def _export_matches_release(rt, head_dim, seed):
    from plait.models.h3.hf_export import EXPORTS

    torch.manual_seed(seed)
    cfg = ModelConfig(pattern="H", num_layers=1, hidden_size=HID, num_heads=2)
    cfg.h3.head_dim, cfg.h3.state_size = head_dim, 8
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = H3(cfg, mp, 0, SequenceParallel())
    state = {k: v.detach().clone() for k, v in m.named_parameters()}
    for k in state:
        if k.endswith("bias"):
            state[k] = torch.randn_like(state[k])  # biases are zero at init: make them count
    released = EXPORTS["H"].to_hf(state, cfg, 0)
    # A trained release has B != 1 / e_1: give it random B (and C rescaled so the kernels stay
    # O(1)), import, and compare plait's layer with the released formulas on those tensors.
    released["kernel.kernel.B"] = torch.randn_like(released["kernel.kernel.B"])
    released["ssm_k_kernel.kernel.B"] = torch.randn_like(released["ssm_k_kernel.kernel.B"]) * 0.3
    res = m.load_state_dict(EXPORTS["H"].from_hf(released, cfg, 0), strict=False)
    assert not res.unexpected_keys and all("_extra_state" in k for k in res.missing_keys), res
    x = torch.randn(2, T, HID)
    return m(x, None).detach(), released_h3(released, x, HID // head_dim, head_dim)


@pytest.mark.parametrize("head_dim", [1, 2])
@pytest.mark.parametrize("seed", [0, 1])
def test_released_layout_computes_the_released_layer(head_dim, seed):
    """Tensors in the released layout (with trained-looking B vectors) imported into plait
    give the released layer's output: the B folding, inv_A_real, the per-channel shift SSM,
    the bilinear kernel and the (d h) readout order are all pinned here."""
    ours, ref = run_distributed(_export_matches_release, 1, head_dim, seed)[0]
    assert_rel_close(ours, ref, 1e-5, "output")


def _h3_inits(rt):
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="HH", num_layers=2, hidden_size=256, num_heads=2)
    cfg.h3.head_dim, cfg.h3.state_size = 2, 64
    mp = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
    m = H3(cfg, mp, 0, SequenceParallel())
    return m.shift_C.detach(), m.shift_D.detach(), m.out_proj.weight.detach()


def test_released_inits():
    """Shift SSM taps U(+-1/sqrt(N)) (the release's kaiming_uniform(a=sqrt(5)) on [d, 1, N]),
    one kernel and skip per channel (256 channels, not 128 heads), and an output projection
    of std init_std, not depth-scaled (the release rescales only out_proj / fc2)."""
    shift_C, shift_D, w_out = run_distributed(_h3_inits, 1)[0]
    assert shift_C.shape == (256, 64) and shift_D.shape == (256,)
    assert shift_C.abs().max() <= 1 / 8 and shift_C.abs().max() > 0.12
    assert abs(shift_C.std().item() - 1 / (3 * 64) ** 0.5) < 0.005
    assert abs(w_out.std().item() - 0.02) < 0.001
