"""Shared fixtures for kernel tests."""

import os

import pytest
import torch


def triton_device() -> str | None:
    """Where Triton kernels can run: CUDA if present, else the CPU interpreter, else nowhere."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


requires_triton = pytest.mark.skipif(
    triton_device() is None, reason="no CUDA and TRITON_INTERPRET is not 1"
)


def random_doc_ids(B: int, T: int, p: float, seed: int) -> torch.Tensor:
    """Documents of random lengths: each token starts a new one with probability p."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < p
    starts[:, 0] = False
    return starts.long().cumsum(1) + 1000 * torch.arange(B)[:, None]
