"""Chunked gated delta rule in PyTorch: the WY / UT form (Yang et al., 2024), the CPU path.

Per chunk of C tokens with in-chunk cumulative log-decay G_i = g_1 + ... + g_i:
  * D[i, j] = exp(G_i - G_j) for j <= i in the same document, else 0;
  * A = strictly-lower((beta k) k^T * D), and the UT transform T = (I + A)^-1 (one
    unit-triangular solve) turns the chunk's C sequential delta-rule writes into matmuls:
    U = T (beta v) (the values to write, before the old state's prediction is removed) and
    W = T (beta k * exp(G) * carry) (how the old state S enters them);
  * V' = U - W S, the chunk's corrected values;
  * O = (q * exp(G) * carry) S + ((q k^T) * D) V';
  * S <- exp(G_C) [the chunk continues its first document] S + (k * exp(G_C - G_j) * last)^T V',
    i.e. S <- P S + M with P = exp(G_C)[...] I - k_end^T W and M = k_end^T U (k_end the
    decayed keys of the last document).
``carry`` marks the tokens of the document the previous chunk ended in (row start: the
initial state's), ``last`` those of the chunk's last document: documents cut the state inside
a chunk exactly as they do in the recurrence. P and M are formed for all chunks at once, so
the sequential part is one [K, K] @ [K, V] product per chunk; the outputs are batched over
chunks again once the chunk-start states are known. The last chunk is padded with tokens that
write nothing (k = 0, g = 0) and belong to the last document, so the final state is exact.

This follows the release's ``torch_chunk_gated_delta_rule`` (transformers' qwen3_5), with
documents and the initial state's carry added; its gradients are autograd's through these
operations (a hand-written backward that keeps only chunk-start states, as kernels/lightning
does, is not written yet: autograd keeps the per-chunk [C, C] and [C, K] intermediates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 2048
"""Tokens whose chunks are processed together: the per-chunk [C, C] and [C, K] tensors of a
group stay small (at 16K tokens and 8 heads, all chunks at once made 33 MB tensors, which the
CPU allocator maps and unmaps on every use; per-token time doubled from 4K to 16K)."""


def gated_delta_chunk(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTV: torch.Tensor,
    g_BHT: torch.Tensor,
    beta_BHT: torch.Tensor,
    doc_ids_BT: torch.Tensor | None = None,
    initial_state_BHKV: torch.Tensor | None = None,
    return_state: bool = False,
    scale: float | None = None,
    block: int = 64,
    scan: str = "loop",
    group: int = GROUP,
):
    """The chunked form; same arguments and results as ``gated_delta_recurrent``. ``scan``:
    the sequential part as a Python loop ("loop", the CPU path) or as one Triton kernel each
    way ("triton", the GPU path: kernels/gated_delta/triton.py). Chunks are processed in
    groups of ``group`` tokens, the state carried from group to group."""
    acc = torch.promote_types(q_BHTK.dtype, torch.float32)
    B, H, T, K = q_BHTK.shape
    C = block
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(acc) for x in (q_BHTK, k_BHTK, v_BHTV, g_BHT, beta_BHT))
    q = q * scale
    pad = (-T) % C
    if doc_ids_BT is None:
        doc = torch.zeros(B, T + pad, dtype=torch.int64, device=q.device)
    else:
        doc = F.pad(doc_ids_BT.to(torch.int64), (0, pad), mode="replicate") if pad else doc_ids_BT
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))
    g, beta = (x.reshape(B, H, N, C) for x in (g, beta))
    doc = doc.reshape(B, N, C)
    # The document each chunk's state belongs to: the previous chunk's last (the row's first
    # document for chunk 0, which continues the initial state).
    prev = torch.cat([doc[:, :1, 0], doc[:, :-1, -1]], dim=1)  # [B, N]
    S = (
        initial_state_BHKV.to(acc)
        if initial_state_BHKV is not None
        else q.new_zeros(B, H, K, v.shape[-1])
    )
    per = max(1, group // C)
    outs = []
    for n0 in range(0, N, per):
        sl = slice(n0, min(N, n0 + per))
        o, S = _chunks(q[:, :, sl], k[:, :, sl], v[:, :, sl], g[:, :, sl], beta[:, :, sl],
                       doc[:, sl], prev[:, sl], S, scan)
        outs.append(o)
    out = torch.cat(outs, dim=2).reshape(B, H, N * C, -1)[:, :, :T].to(q_BHTK.dtype)
    return (out, S) if return_state else out


def _chunks(q, k, v, g, beta, doc, prev, S, scan: str):
    """A run of consecutive chunks ([B, H, n, C, .]) continued from the state S: (their
    outputs [B, H, n, C, V], the state after them)."""
    acc = q.dtype
    B, H, n, C, K = q.shape
    V = v.shape[-1]
    carry = (doc == prev[..., None]).to(acc)[:, None]  # [B, 1, n, C]
    last = (doc == doc[..., -1:]).to(acc)[:, None]
    G = g.cumsum(-1)  # [B, H, n, C]
    tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    same = (doc[..., :, None] == doc[..., None, :]) & tri  # [B, n, C, C]
    expo = (G[..., :, None] - G[..., None, :]).masked_fill(~same[:, None], float("-inf"))
    Dm = expo.exp()  # [B, H, n, C, C]
    kb = k * beta[..., None]
    A = ((kb @ k.transpose(-1, -2)) * Dm).tril(-1)
    Tm = torch.eye(C, dtype=acc, device=q.device) + A
    eG = G.exp()[..., None]
    rhs = torch.cat([v * beta[..., None], kb * eG * carry[..., None]], dim=-1)
    U, W = torch.linalg.solve_triangular(Tm, rhs, upper=False, unitriangular=True).split(
        [V, K], dim=-1
    )  # one solve for both right-hand sides
    attn = (q @ k.transpose(-1, -2)) * Dm
    q_state = q * eG * carry[..., None]
    k_upd = k * (G[..., -1:] - G).exp()[..., None] * last[..., None]
    chunk_decay = (G[..., -1].exp() * carry[..., -1])[..., None, None]  # [B, H, n, 1, 1]
    # Each chunk's state map is affine, S' = P S + M: P = decay I - k_upd^T W, M = k_upd^T U,
    # all chunks at once; the sequential part is one [K, K] @ [K, V] product per chunk.
    k_upd_t = k_upd.transpose(-1, -2)
    P = chunk_decay * torch.eye(K, dtype=acc, device=q.device) - k_upd_t @ W
    M = k_upd_t @ U
    if scan == "triton":
        from .triton import affine_scan_triton

        S_in, S = affine_scan_triton(P, M, S)
    else:
        starts = []
        # unbind, not P[:, :, n]: each indexing's backward would fill a zero tensor per chunk
        for P_n, M_n in zip(P.unbind(2), M.unbind(2), strict=True):
            starts.append(S)
            S = P_n @ S + M_n
        S_in = torch.stack(starts, dim=2)  # [B, H, n, K, V]: the state entering each chunk
    v_new = U - W @ S_in
    return q_state @ S_in + attn @ v_new, S
