"""The convolution operators under sequence parallelism.

* Short (FIR) causal convolutions -- Based's depthwise conv, and any long convolution whose
  kernel is no longer than one chunk plus one, such as H3's shift SSM -- only need the last
  K - 1 inputs of the previous rank: a halo exchange (parallel/halo.py), then the local kernel
  over [halo, own chunk].
* The diagonal SSM (S4D) has a constant-size state, so it gets LASP-2's treatment: each rank
  computes the complex state its chunk hands on from zero, one all-gather, a prefix
  combination with A_bar^C, and the inter-chunk term 2 Re(C A_bar^(t+1) P_r) on the rank's
  first document.
* Other long convolutions (kernel longer than a chunk, no state): the inputs are all-gathered
  and each rank convolves the prefix it needs (exact, bytes grow with the sequence).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from plait.kernels.longconv import diag_ssm_kernel, discretise
from plait.kernels.longconv import long_conv as long_conv_kernel
from plait.kernels.shortconv import short_conv as short_conv_kernel

from .collectives import all_gather, all_gather_nograd
from .halo import _Halo, _shift

if TYPE_CHECKING:
    from .sequence import SequenceParallel


def _group(sp: SequenceParallel, what: str):
    sp.require_contiguous(what)
    return sp.group if sp.world > 1 else None


def short_conv(sp: SequenceParallel, x, w, bias=None, doc_ids=None) -> torch.Tensor:
    """Depthwise causal convolution [B, T, C] in the context ``sp`` (halo of K - 1 tokens;
    Based's C)."""
    return short_conv_sp(x, w, bias, _group(sp, "short convolution (halo)"), doc_ids=doc_ids)


def long_conv(sp: SequenceParallel, u, k, doc_ids=None) -> torch.Tensor:
    """Causal long convolution [B, T, C] with kernel [C, L] in the context ``sp`` (halo when
    the kernel fits in a chunk, else the gathered prefix; H3's shift SSM, SeqBoat's EMA)."""
    return long_conv_sp(u, k, _group(sp, "long convolution"), doc_ids=doc_ids)


def diag_ssm(
    sp: SequenceParallel, u, log_dt, A, C, doc_ids=None, method: str = "bilinear"
) -> torch.Tensor:
    """S4D diagonal SSM as a convolution in the context ``sp`` (state passing across ranks;
    H3's diagonal SSM)."""
    group = _group(sp, "diagonal SSM (state passing)")
    return diag_ssm_sp(u, log_dt, A, C, group, doc_ids=doc_ids, method=method)


def _with_halo(x_BTC: torch.Tensor, h: int, doc_ids, group):
    B, C, _ = x_BTC.shape
    if h > C:
        raise ValueError(f"halo of {h} tokens is longer than the {C} tokens per rank")
    halo = _Halo.apply(x_BTC[:, C - h :], group)
    docs = (
        doc_ids if doc_ids is not None else torch.zeros(B, C, dtype=torch.long, device=x_BTC.device)
    )
    halo_docs = _shift(docs[:, C - h :], group, forward=True)
    if dist.get_rank(group) == 0:
        halo_docs = torch.full_like(halo_docs, -1)
    return torch.cat([halo, x_BTC], dim=1), torch.cat([halo_docs, docs], dim=1)


def short_conv_sp(x_BTC, w_CK, bias_C=None, group=None, *, doc_ids=None, backend="auto"):
    K = w_CK.shape[1]
    if group is None or dist.get_world_size(group) == 1 or K == 1:
        return short_conv_kernel(x_BTC, w_CK, bias_C, doc_ids=doc_ids, backend=backend)
    x_ext, docs = _with_halo(x_BTC, K - 1, doc_ids, group)
    return short_conv_kernel(x_ext, w_CK, bias_C, doc_ids=docs, backend=backend)[:, K - 1 :]


def long_conv_sp(u_BTC, k_CL, group=None, *, doc_ids=None):
    """Causal long convolution of this rank's chunk; halo when the kernel fits, else the
    gathered prefix."""
    if group is None or dist.get_world_size(group) == 1:
        return long_conv_kernel(u_BTC, k_CL, doc_ids=doc_ids)
    B, C, _ = u_BTC.shape
    L = k_CL.shape[1]
    if L - 1 <= C:
        u_ext, docs = _with_halo(u_BTC, L - 1, doc_ids, group)
        return long_conv_kernel(u_ext, k_CL, doc_ids=docs)[:, L - 1 :]
    r = dist.get_rank(group)
    W = dist.get_world_size(group)
    full = all_gather(u_BTC, group).transpose(0, 1).reshape(B, W * C, -1)[:, : (r + 1) * C]
    docs = None
    if doc_ids is not None:
        docs = all_gather_nograd(doc_ids, group).transpose(0, 1).reshape(B, W * C)[:, : (r + 1) * C]
    return long_conv_kernel(full, k_CL, doc_ids=docs)[:, r * C :]


def diag_ssm_sp(u_BTC, log_dt_C, A_CS, C_CS, group=None, *, doc_ids=None, method="bilinear"):
    """The S4D convolution y = k * u (k = diag_ssm_kernel) of this rank's chunk, exactly as the
    single-rank operator, with one all-gather of [B, C, S] complex states."""
    B, T, ch = u_BTC.shape
    k = diag_ssm_kernel(log_dt_C, A_CS, C_CS, T, method)
    local = long_conv_kernel(u_BTC, k, doc_ids=doc_ids)
    if group is None or dist.get_world_size(group) == 1:
        return local
    W, r = dist.get_world_size(group), dist.get_rank(group)
    rdt = A_CS.real.dtype
    log_A_bar, B_bar = discretise(log_dt_C, A_CS, method)
    t = torch.arange(T, device=u_BTC.device, dtype=rdt)
    # state from zero at the chunk end: sum_j A_bar^(T-1-j) B_bar u_j over the last document
    w = torch.exp(log_A_bar[..., None] * (T - 1 - t))  # [ch, S, T]
    u = u_BTC.to(rdt)
    if doc_ids is not None:
        u = u * (doc_ids == doc_ids[:, -1:]).to(rdt)[..., None]
    M = torch.einsum("cst,btc->bcs", w, u.to(w.dtype)) * B_bar[None]
    M_all = torch.view_as_complex(all_gather(torch.view_as_real(M), group))  # [W, B, ch, S]
    if doc_ids is None:
        whole = cont = torch.ones(W, B, dtype=torch.bool, device=u.device)
    else:
        ends = all_gather_nograd(torch.stack([doc_ids[:, 0], doc_ids[:, -1]]), group)
        whole = ends[:, 0] == ends[:, 1]
        cont = torch.zeros_like(whole)
        cont[1:] = ends[1:, 0] == ends[:-1, 1]
    carry = torch.exp(log_A_bar * T)[None]  # [1, ch, S]
    state = M_all[0] * 0  # keeps every rank in the gather's backward
    for s in range(r):
        keep = (whole[s] & cont[s]).to(rdt)[:, None, None]
        state = M_all[s] + keep * carry * state
    state = state * cont[r].to(rdt)[:, None, None]
    # y_t += 2 Re(sum_s C_s A_bar_s^(t+1) P_s) on the first document
    decay = torch.exp(log_A_bar[..., None] * (t + 1))  # [ch, S, T]
    inter = 2 * torch.einsum("cs,cst,bcs->btc", C_CS, decay, state).real
    if doc_ids is not None:
        inter = inter * (doc_ids == doc_ids[:, :1]).to(rdt)[..., None]
    return (local.to(rdt) + inter).to(u_BTC.dtype)
