"""Sliding-window attention in blocks of the window size, in PyTorch.

Queries are cut into blocks of C = window - 1 tokens (a query sees itself and the window - 1
keys before it, so never further back than the previous block); each block attends to a
[C, 2C] slab. Based's released window of 129 keys makes C = 128: no padding at power-of-two
lengths (window attention of based-25m at 8K, fwd + bwd: 680 -> 657 ms against C = window).
Memory and time are O(T * w), linear in the sequence length (``swa`` takes flash_cpu.py
instead where it applies: values as wide as keys, window >= 2). Masked scores use the
dtype's lowest finite value, not -inf, so that rows of padding (beyond T) stay finite and
cannot poison the gradients. The [T, 2C] scores are built once and masked in place: at long
sequences those temporaries, not the model's inputs, set a layer's peak memory.
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
    C = max(1, min(window - 1, T))
    n = -(-T // C)
    pad = n * C - T

    def blocks(x):  # [B, H, T, *] -> [B, H, n, C, *]; a copy only to pad or cast
        x = x.to(acc)
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, H, n, C, x.shape[-1])

    # The scale goes on q (T x D) rather than on the scores (T x 2C); every temporary of
    # T x 2C floats is ~4 times the size of the layer's input at Based's shapes, and the
    # peak of a long sequence is made of them.
    Qb, Kb, Vb = blocks(q_BHTD * scale), blocks(k_BHTD), blocks(v_BHTE)
    # keys/values of the previous block next to this block's: [B, H, n, 2C, D]
    Kx = torch.cat([F.pad(Kb, (0, 0, 0, 0, 1, 0))[:, :, :n], Kb], dim=3)
    Vx = torch.cat([F.pad(Vb, (0, 0, 0, 0, 1, 0))[:, :, :n], Vb], dim=3)

    dev = q_BHTD.device
    # query i of a block and key j of its [previous, own] pair are i - j + C apart in every
    # block: one [C, 2C] band, and only the first block's previous keys (before 0) are absent
    gap = torch.arange(C, device=dev)[:, None] - torch.arange(2 * C, device=dev) + C
    band = (gap >= 0) & (gap < window)  # [C, 2C]
    absent = torch.zeros(n, 1, 2 * C, dtype=torch.bool, device=dev)
    absent[0, 0, :C] = True
    hidden = (~band | absent)[None, None]  # [1, 1, n, C, 2C]
    if doc_ids_BT is not None:
        d = F.pad(doc_ids_BT, (0, pad), value=-1)
        d_prev = F.pad(d, (C, 0), value=-2)[:, : n * C]
        dq = d.view(B, n, C)
        dk = torch.cat([d_prev.view(B, n, C), d.view(B, n, C)], dim=2)
        hidden = hidden | (dq[:, :, :, None] != dk[:, :, None, :])[:, None]
    s = torch.einsum("bhncd,bhnjd->bhncj", Qb, Kx)  # [B, H, n, C, 2C]
    s = s.masked_fill_(hidden, torch.finfo(acc).min)  # in place: matmul's backward needs no s
    p = s.softmax(-1)
    del s  # freed before the next product (softmax keeps only its output for the backward)
    o = torch.einsum("bhncj,bhnje->bhnce", p, Vx)
    return o.view(B, H, n * C, E)[:, :, :T].to(q_BHTD.dtype)
