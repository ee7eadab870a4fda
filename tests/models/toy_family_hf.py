"""Letter X's HF-side module: what an export of a model with the toy family's letter ships
(as ``mixer_toy.py``) beside plait's modeling code. Plain PyTorch, importing nothing from
plait, like every family's ``hf_mixer.py``; the toy family (toy_family.py) names this file in
its ``Family.hf_code`` and the class in its letter's ``hf_export.hf_class``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Taps(nn.Module):
    """The depthwise convolution's taps [channels, kernel] (plait's ``taps``), as ``weight``."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, kernel))


class TokenShift(nn.Module):
    """out = o_proj(SiLU(conv_K(a_proj x)) * b_proj x), the causal depthwise convolution of K
    taps continued from the state: ``conv``, the last K - 1 inputs [B, K - 1, hidden]
    (zeros at the start). A padding token enters the convolution as zero, as the start of
    a sequence does."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        h = config.hidden_size
        self.kernel = config.options("toy").get("kernel", 2)
        self.a_proj = nn.Linear(h, h, bias=False)
        self.b_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.conv = _Taps(h, self.kernel)

    def forward(self, x_BTC, positions_BT, pad_BT, state):
        B, T, C = x_BTC.shape
        a, b = self.a_proj(x_BTC), self.b_proj(x_BTC)
        if pad_BT is not None:
            a = a * (~pad_BT)[..., None].to(a.dtype)
        tail = state["conv"] if state is not None else a.new_zeros(B, self.kernel - 1, C)
        u = torch.cat((tail, a), 1)
        w = self.conv.weight[:, None, :].to(u.dtype)
        y = F.conv1d(u.transpose(1, 2), w, groups=C).transpose(1, 2)
        return self.o_proj(F.silu(y) * b), {"conv": u[:, u.shape[1] - (self.kernel - 1) :]}
