"""Sliding-window attention in blocks of the window size, in PyTorch.

Queries are cut into blocks of C = window tokens; a query block can only see keys of its own
block and of the previous one, so each block attends to a [C, 2C] slab. Memory and time are
O(T * w), linear in the sequence length. Masked scores use the dtype's lowest finite value,
not -inf, so that rows of padding (beyond T) stay finite and cannot poison the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swa_chunk(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    window: int,
    doc_ids_BT: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    B, H, T, D = q_BHTD.shape
    E = v_BHTE.shape[-1]
    acc = torch.promote_types(q_BHTD.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    C = max(1, min(window, T))
    n = -(-T // C)
    pad = n * C - T
    q, k, v = (F.pad(x.to(acc), (0, 0, 0, pad)) for x in (q_BHTD, k_BHTD, v_BHTE))
    # keys/values of the previous block next to this block's: [B, H, n, 2C, D]
    k_prev = F.pad(k, (0, 0, C, 0))[:, :, : n * C]
    v_prev = F.pad(v, (0, 0, C, 0))[:, :, : n * C]
    Kx = torch.cat([k_prev.view(B, H, n, C, D), k.view(B, H, n, C, D)], dim=3)
    Vx = torch.cat([v_prev.view(B, H, n, C, E), v.view(B, H, n, C, E)], dim=3)
    Qb = q.view(B, H, n, C, D)

    dev = q.device
    qpos = torch.arange(n * C, device=dev).view(n, C)
    kpos = qpos[:, :1] - C + torch.arange(2 * C, device=dev)  # [n, 2C]
    dist = qpos[:, :, None] - kpos[:, None, :]  # [n, C, 2C]
    mask = ((dist >= 0) & (dist < window) & (kpos >= 0)[:, None, :])[None, None]
    if doc_ids_BT is not None:
        d = F.pad(doc_ids_BT, (0, pad), value=-1)
        d_prev = F.pad(d, (C, 0), value=-2)[:, : n * C]
        dq = d.view(B, n, C)
        dk = torch.cat([d_prev.view(B, n, C), d.view(B, n, C)], dim=2)
        mask = mask & (dq[:, :, :, None] == dk[:, :, None, :])[:, None]
    s = torch.einsum("bhncd,bhnjd->bhncj", Qb, Kx) * scale
    s = s.masked_fill(~mask, torch.finfo(acc).min)
    o = torch.einsum("bhncj,bhnje->bhnce", s.softmax(-1), Vx)
    return o.reshape(B, H, n * C, E)[:, :, :T].to(q_BHTD.dtype)
