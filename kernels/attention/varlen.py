"""Causal attention within documents on CUDA: flash attention's variable-length kernel.

The [B, H, T, D] rows are packed into [B * T, H, D] tokens and the documents given as
cu_seqlens (every row start is a document start, so no document spans two rows); one launch
covers every document of the batch. The flash kernel takes fp16 and bf16 only (float32 on
CUDA takes the per-document path). Not yet run on a GPU: the packing is tested on CPU with a
stand-in for the kernel (tests/kernels/test_attention.py).
"""

from __future__ import annotations

import torch

from plait.kernels.docs import cu_seqlens_from_doc_ids


def _varlen_attn():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def causal_attention_varlen(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTE: torch.Tensor,
    doc_ids_BT: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    B, H, T, _ = q_BHTD.shape
    cu = cu_seqlens_from_doc_ids(doc_ids_BT)
    longest = int((cu[1:] - cu[:-1]).max())
    cu = cu.to(torch.int32)

    def pack(x):  # [B, H, T, D] -> [B * T, H, D]
        return x.transpose(1, 2).reshape(B * T, H, x.shape[-1])

    o = _varlen_attn()(
        pack(q_BHTD), pack(k_BHTD), pack(v_BHTE), cu, cu, longest, longest,
        scale=scale, window_size=(-1, 0),
    )
    return o.view(B, T, H, -1).transpose(1, 2)
