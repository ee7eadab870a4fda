"""Long causal convolution by FFT over 2N (H3's SSM convolutions; the CPU and the CUDA path).

rfft of the input and of the kernel, zero-padded to a fast FFT size >= 2T so that the circular
convolution equals the linear (causal) one, product, irfft, first T outputs: O(T log T).
Computed in float32 (float64 if given); bf16 FFTs lose too much.

On CUDA this is torch.fft (cuFFT), not a Triton kernel: FlashConv-style fusion of the two FFTs
pays off for short sequences, but cuFFT is the well-kept path and the GPU comparison has not
been measured yet (see docs/benchmarks.md).

Documents: each document is convolved on its own. The packed batch is unpacked into a
[documents, longest document, C] tensor (one gather), convolved, and packed back (one gather),
so the FFT size follows the longest document, not the row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes pocketfft and cuFFT handle fastest)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _fft_conv(u_NTC: torch.Tensor, k_CL: torch.Tensor) -> torch.Tensor:
    T = u_NTC.shape[1]
    n = _fft_size(2 * T)
    k = k_CL[:, :T]
    if k.shape[1] < T:
        k = F.pad(k, (0, T - k.shape[1]))
    U = torch.fft.rfft(u_NTC, n=n, dim=1)
    Kf = torch.fft.rfft(k, n=n, dim=1).t()[None]  # [1, n//2+1, C]
    return torch.fft.irfft(U * Kf, n=n, dim=1)[:, :T]


def long_conv_fft(
    u_BTC: torch.Tensor, k_CL: torch.Tensor, doc_ids_BT: torch.Tensor | None = None
) -> torch.Tensor:
    acc = torch.promote_types(u_BTC.dtype, torch.float32)
    u, k = u_BTC.to(acc), k_CL.to(acc)
    if doc_ids_BT is None:
        return _fft_conv(u, k).to(u_BTC.dtype)
    B, T, C = u.shape
    flat = doc_ids_BT.reshape(-1)
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = flat[1:] != flat[:-1]
    start[torch.arange(B, device=u.device) * T] = True  # rows never share a document
    doc = start.long().cumsum(0) - 1  # [B*T] document number
    starts = torch.nonzero(start).flatten()
    pos = torch.arange(B * T, device=u.device) - starts[doc]  # position inside the document
    n_docs = starts.numel()
    longest = int(pos.max().item()) + 1
    padded = u.new_zeros(n_docs, longest, C)
    padded[doc, pos] = u.reshape(B * T, C)
    y = _fft_conv(padded, k)[doc, pos]
    return y.reshape(B, T, C).to(u_BTC.dtype)
