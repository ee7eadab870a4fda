"""Norms, rotary embedding and channel mixers shared by every family.

The linear layers are megatron-core's tensor-parallel bricks; everything else holds no
process-group state. Column-parallel layers split their output dimension across TP ranks,
row-parallel ones their input dimension and all-reduce the output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from plait.parallel.tensor_parallel import sum_over_tp, tp_rank_and_size

from .config import ModelConfig, ModelConfigError


def normal_init(std: float):
    def init_(w: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(w, mean=0.0, std=std)

    return init_


def output_init(cfg: ModelConfig):
    """Scaled init for projections that write into the residual stream (GPT-2 / Megatron)."""
    return normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers))


def column_linear(
    cfg: ModelConfig, mp: ModelParallelConfig, out_features: int, bias: bool = False
) -> ColumnParallelLinear:
    """A projection from the hidden size whose output features TP splits (each rank its own
    heads' rows, not gathered): the per-role projections of the released layers that plait
    keeps apart so that a contiguous split hands every rank whole heads (gdn, mamba2)."""
    return ColumnParallelLinear(
        cfg.hidden_size, out_features, config=mp, bias=bias, gather_output=False,
        init_method=normal_init(cfg.init_std),
    )


def row_linear(
    cfg: ModelConfig, mp: ModelParallelConfig, in_features: int, bias: bool = False
) -> RowParallelLinear:
    """The matching output projection back to the hidden size (input split, output summed
    over TP; a bias is added after the sum), with the residual-scaled init."""
    return RowParallelLinear(
        in_features, cfg.hidden_size, config=mp, bias=bias, input_is_parallel=True,
        skip_bias_add=False, init_method=output_init(cfg),
    )


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight; ``learnable=False`` gives SRMSNorm (no weight).

    Computed in float32 and cast back: the mean of squares is the first thing to overflow
    or lose precision in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if learnable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(xf.dtype)
        return y.to(x.dtype)


class FullWidthSRMSNorm(nn.Module):
    """SRMSNorm over the full width of a tensor whose last dim is split across TP ranks.

    The mean of squares is summed over the TP group (``sum_over_tp``: all-reduce forward and
    backward), so the result equals the single-rank norm of the concatenated tensor. One
    [B, T, 1] all-reduce per call.
    """

    def __init__(self, full_dim: int, eps: float = 1e-6):
        super().__init__()
        self.full_dim = full_dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        ms = sum_over_tp(xf.pow(2).sum(-1, keepdim=True)) / self.full_dim
        return (xf * torch.rsqrt(ms + self.eps)).to(x.dtype)


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in at least float32: the precision of plait's float32 islands (norms, rotary,
    routers) for bf16 and fp32 models, without rounding a float64 model (the reference runs
    of the tests) down to float32."""
    return x if x.dtype == torch.float64 else x.float()


class LayerNorm(nn.Module):
    """(x - mean) * rsqrt(var + eps) * weight + bias, in float32 like ``RMSNorm`` (GPT-2's
    norm, which H3's and SeqBoat's released models use)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = wide(x)
        y = F.layer_norm(
            xf, xf.shape[-1:], self.weight.to(xf.dtype), self.bias.to(xf.dtype), self.eps
        )
        return y.to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    if cfg.norm == "layernorm":
        return LayerNorm(dim or cfg.hidden_size, cfg.norm_eps)
    return RMSNorm(dim or cfg.hidden_size, cfg.norm_eps, learnable=cfg.norm == "rmsnorm")


def norm_params(cfg: ModelConfig) -> int:
    """Parameters of one norm over the model width."""
    return {"rmsnorm": 1, "srmsnorm": 0, "layernorm": 2}[cfg.norm] * cfg.hidden_size


def rotary_cos_sin(positions_BT: torch.Tensor, head_dim: int, theta: float):
    """cos and sin tables [B, 1, T, head_dim/2] for the given (possibly per-document) positions."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=positions_BT.device).float() / head_dim)
    )
    angles_BTF = positions_BT.float()[..., None] * inv_freq
    return angles_BTF.cos()[:, None], angles_BTF.sin()[:, None]


def apply_rotary(x_BHTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the GPT-NeoX / LLaMA convention, also what HF export will expect).
    With tables for fewer dims than x has (``rotary_cos_sin(positions, r, ...)``), only the
    first r dims rotate and the rest pass through (partial rotary, flash-attn's and
    GPT-NeoX's ``rotary_dim``)."""
    r = 2 * cos.shape[-1]
    xr, rest = x_BHTD[..., :r], x_BHTD[..., r:]
    x1, x2 = wide(xr).chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x_BHTD.dtype)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def attend_cached(q_BHTD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor) -> torch.Tensor:
    """Causal attention of T new queries over S >= T keys whose last T are theirs (a KV
    cache plus the new tokens): query i sees keys 0 .. S - T + i. SDPA without a mask for
    one query (the decode step), with the bottom-right causal mask otherwise."""
    T, S = q_BHTD.shape[2], k_BHSD.shape[2]
    if T == 1:
        return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD)
    mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)
    return F.scaled_dot_product_attention(q_BHTD, k_BHSD, v_BHSD, attn_mask=mask)


def local_heads(num_heads: int, what: str = "num_heads") -> tuple[int, int]:
    """(heads on this TP rank, index of its first head); heads are split contiguously."""
    rank, tp = tp_rank_and_size()
    if num_heads % tp:
        raise ModelConfigError(
            f"{what}: {num_heads} heads cannot be split over tensor_parallel={tp} ranks"
        )
    h = num_heads // tp
    return h, rank * h


class HeadProjections(nn.Module):
    """Fused column-parallel projection to several tensors per head, plus the out projection.

    Output rows are laid out head by head, [head, role, dim] with ``dims`` giving each role's
    size (q, k, v, u ...), so a contiguous TP split hands each rank whole heads with all their
    roles. The out projection is row-parallel from ``heads * out_dim`` to hidden. With
    ``bias`` both have biases (zero at init; the out bias is added once, after the reduce).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        mp: ModelParallelConfig,
        num_heads: int,
        dims: tuple[int, ...],
        out_dim: int,
        bias: bool = False,
    ):
        super().__init__()
        self.dims = dims
        self.heads, self.first_head = local_heads(num_heads)
        self.in_proj = ColumnParallelLinear(
            cfg.hidden_size,
            num_heads * sum(dims),
            config=mp,
            bias=bias,
            gather_output=False,
            init_method=normal_init(cfg.init_std),
        )
        self.out_proj = RowParallelLinear(
            num_heads * out_dim,
            cfg.hidden_size,
            config=mp,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            init_method=output_init(cfg),
        )

    def split(self, x_BTC: torch.Tensor) -> list[torch.Tensor]:
        """Project and return one tensor [B, H_local, T, dim] per role."""
        y, _ = self.in_proj(x_BTC)
        B, T, _ = y.shape
        y = y.view(B, T, self.heads, sum(self.dims)).transpose(1, 2)
        return list(y.split(self.dims, dim=-1))

    def merge(self, o_BHTD: torch.Tensor) -> torch.Tensor:
        B, H, T, D = o_BHTD.shape
        out, _ = self.out_proj(o_BHTD.transpose(1, 2).reshape(B, T, H * D))
        return out


class GeluMLP(nn.Module):
    """The GPT-2 MLP, W2(gelu(W1 x + b1)) + b2 (H3's channel mixer)."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        self.w1 = ColumnParallelLinear(
            h, f, config=mp, bias=True, gather_output=False, init_method=normal_init(cfg.init_std)
        )
        self.w2 = RowParallelLinear(
            f, h, config=mp, bias=True, input_is_parallel=True, skip_bias_add=False,
            init_method=output_init(cfg),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.w1(x)
        out, _ = self.w2(F.gelu(a, approximate="tanh"))
        return out


def make_mlp(cfg: ModelConfig, mp: ModelParallelConfig) -> nn.Module | None:
    """The channel mixer, or None for ``mlp: none``."""
    if cfg.mlp == "none":
        return None
    return GeluMLP(cfg, mp) if cfg.mlp == "gelu" else GatedMLP(cfg, mp)


class GatedMLP(nn.Module):
    """W3(act(W1 x) * W2 x): SwiGLU (act = SiLU) or SGLU (act = identity).

    W1 and W2 are two column-parallel layers rather than one fused [W1; W2]: a contiguous
    TP split of a fused weight would hand rank 0 all of W1, and the separate layers keep
    checkpoint and HF-export mappings one tensor to one tensor.
    """

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig):
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_size
        common = dict(config=mp, bias=False, gather_output=False)
        self.w1 = ColumnParallelLinear(h, f, init_method=normal_init(cfg.init_std), **common)
        self.w2 = ColumnParallelLinear(h, f, init_method=normal_init(cfg.init_std), **common)
        self.w3 = RowParallelLinear(
            f,
            h,
            config=mp,
            init_method=output_init(cfg),
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        self.act = F.silu if cfg.mlp == "swiglu" else (lambda t: t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.w1(x)
        b, _ = self.w2(x)
        out, _ = self.w3(self.act(a) * b)
        return out
