"""Based (Arora et al., 2024): Taylor linear attention ``B`` + sliding window ``W`` + gated
short convolutions ``C``."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc

from .config import BasedOptions
from .hf_export import EXPORTS
from .mixer import BasedLinearAttention, GatedShortConv, SlidingWindowAttention
from .presets import PRESETS
from .tp_plan import PLAN


def _taylor_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Linear attention over the deduplicated 2nd-order Taylor features (F = 1 + f +
    f(f+1)/2) with the normaliser as an extra value column: causal blocks plus the
    [F, d + 1] state read-out and update per head."""
    f, d = cfg.based.feature_dim, cfg.head_dim
    F = 1 + f + f * (f + 1) // 2
    block = min(cfg.lightning_block, seq_len)
    return cfg.num_heads * ((F + d + 1) * (block + 1) + 4 * F * (d + 1))


def _window_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Scores and values over at most ``based.window`` keys per query."""
    keys = min(cfg.based.window, (seq_len + 1) / 2)
    return 4 * cfg.hidden_size * keys


def _conv_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Depthwise taps over the convolved half, SiLU and the gate."""
    inner = cfg.based.conv_expand * cfg.hidden_size // 2
    return inner * (2 * cfg.based.conv_kernel + 2)


B = Letter(
    symbol="B",
    mixer=BasedLinearAttention,
    tp_plan=PLAN["B"],
    hf_export=EXPORTS["B"],
    mixing_flops=_taylor_flops,
    doc=LetterDoc(
        description="Based Taylor linear attention",
        sequence_parallel=(
            "LASP-2 over the Taylor-feature states ([F, d + 1] per head, numerator and "
            "normaliser): one all-gather of fixed-size states"
        ),
        decode_state="per head the [F, d + 1] Taylor-feature state (numerator and normaliser)",
        release=(
            "HazyResearch/based's Taylor linear attention (feature dim 16, eps 1e-6, the "
            "fla_parallel path of the 360M and 1.3B models)"
        ),
        differs_from_release=(
            "the based-1b (10B tokens) release ran the quadratic path with eps 1e-12 "
            "(denominators are >= 1: negligible)"
        ),
    ),
)
W = Letter(
    symbol="W",
    mixer=SlidingWindowAttention,
    tp_plan=PLAN["W"],
    hf_export=EXPORTS["W"],
    mixing_flops=_window_flops,
    selective_recompute=True,
    doc=LetterDoc(
        description="sliding-window softmax attention with RoPE (Based)",
        sequence_parallel=(
            "halo exchange: the last window - 1 keys and values go to the next rank (one P2P "
            "send/receive per layer, bytes independent of the sequence length)"
        ),
        decode_state="keys and values of the last window - 1 tokens",
        release=(
            "HazyResearch/based's sliding-window attention: based.window counts the keys a query "
            "sees including itself, so the released window_size 256 (flash-attn (128, 0)) is 129"
        ),
        differs_from_release="none in function",
    ),
)
C = Letter(
    symbol="C",
    mixer=GatedShortConv,
    tp_plan=PLAN["C"],
    hf_export=EXPORTS["C"],
    mixing_flops=_conv_flops,
    doc=LetterDoc(
        description="gated short convolution (Based)",
        sequence_parallel="halo exchange of the last conv_kernel - 1 inputs of the convolved half",
        decode_state="the last conv_kernel - 1 inputs of the convolved half",
        release=(
            "HazyResearch/based's BaseConv (gated short convolution, biases on the projections)"
        ),
        differs_from_release=(
            "the fused in_proj is two matrices (a TP rank holds matching channels of both halves;"
            " the export fuses them)"
        ),
    ),
)

FAMILY = Family(
    name="based",
    description="Based: Taylor linear attention, sliding-window attention, gated convolutions",
    letters=(B, W, C),
    options=BasedOptions,
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="based-1.3b",
)
