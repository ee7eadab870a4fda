"""Mamba-2 hybrids as released in Bamba (IBM, 2024-25; Dao & Gu's Mamba-2, 2024): letter
``D``, the Mamba-2 mixer (its state-space dual is linear attention with a per-token decay,
plait's lightning kernel with ``g``), and ``R``, Bamba's grouped-query attention. Its
patterns of D and R alone export to, and import from, transformers' own ``BambaForCausalLM``
layout (bamba.py)."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc

from .bamba import NATIVE
from .config import Mamba2Options
from .hf_export import EXPORTS
from .mixer import GroupedAttention, Mamba2Mixer
from .presets import PRESETS
from .tp_plan import PLAN

RELEASE = "transformers 5.x models/bamba/modeling_bamba.py"


def _ssd_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """The chunked kernel per head and token (chunk C, state N, head width P): the in-chunk
    scores C . B and their read of the values (2CN + 2CP), the state read-out and update
    (4NP); plus the depthwise convolution over x, B and C and the gated norm."""
    o = cfg.mamba2
    C = min(o.chunk, seq_len)
    per_head = 2 * C * o.state + 2 * C * o.head_dim + 4 * o.state * o.head_dim
    channels = o.width + 2 * o.groups * o.state
    return o.heads * per_head + 2 * o.conv_kernel * channels + 8 * o.width


def _attention_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Scores and values of every query head over (T + 1) / 2 keys on average (causal)."""
    return 2 * cfg.num_heads * cfg.head_dim * (seq_len + 1)


D = Letter(
    symbol="D",
    mixer=Mamba2Mixer,
    tp_plan=PLAN["D"],
    hf_export=EXPORTS["D"],
    mixing_flops=_ssd_flops,
    doc=LetterDoc(
        description="Mamba-2 mixer (Bamba's; the state-space dual on the lightning kernel)",
        sequence_parallel=(
            "LASP-2 with per-token decays: each rank's [state, head_dim] state per head and "
            "its total log-decay in one all-gather (bytes independent of the sequence "
            "length), a prefix combine cut at document starts; the conv's K - 1 token halo"
        ),
        decode_state=(
            "the last conv_kernel - 1 inputs of the convolution and the [state, head_dim] "
            "state per head (constant size)"
        ),
        release=f"BambaMixer ({RELEASE})",
        differs_from_release=(
            "none in function; in_proj and the conv kept as z/x/(B,C)/dt parts (the native "
            "export re-fuses them); documents restart the state and the conv (the release's "
            "PyTorch path refuses packed sequences); dt is clamped to time_step_limit in "
            "decoding too (the release clamps only full-sequence passes; its default limit "
            "is none)"
        ),
    ),
)

R = Letter(
    symbol="R",
    mixer=GroupedAttention,
    tp_plan=PLAN["R"],
    hf_export=EXPORTS["R"],
    mixing_flops=_attention_flops,
    zigzag=True,
    selective_recompute=True,
    doc=LetterDoc(
        description="Bamba's grouped-query softmax attention (partial rotary)",
        sequence_parallel=(
            "as A: LASP-2H (all-gather K and V, repeated over the grouped heads) or Ring "
            "Attention, as parallel.softmax_sp says"
        ),
        decode_state="keys and values of the key/value heads of every previous token",
        release=f"BambaAttention ({RELEASE})",
        differs_from_release="none in function",
    ),
)

FAMILY = Family(
    name="mamba2",
    description="Mamba-2 hybrids as released in Bamba (D Mamba-2 mixers, R attention)",
    letters=(D, R),
    options=Mamba2Options,
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="mamba2-1b",
    native=NATIVE,
)
