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
            ks[:, t] += m.shift_C[:, n].repeat_interleave(d) * k[:, t - n]
        ks[:, t] += m.shift_D.repeat_interleave(d) * k[:, t]
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
    return [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups]


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
