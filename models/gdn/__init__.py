"""Gated DeltaNet as released in Qwen3.5 (Yang, Kautz & Hatamizadeh, 2024; Qwen3-Next,
Qwen3.5): letter ``G``, the Gated DeltaNet mixer, and ``Q``, Qwen3.5's gated softmax
attention. Its patterns of G and Q alone export to, and import from, transformers' own
``Qwen3_5ForCausalLM`` layout (qwen35.py)."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc

from .config import GdnOptions
from .hf_export import EXPORTS
from .mixer import GatedAttention, GatedDeltaNet
from .presets import PRESETS
from .qwen35 import NATIVE
from .tp_plan import PLAN

RELEASE = "transformers 5.x models/qwen3_5/modeling_qwen3_5.py"


def _delta_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """The chunked rule per value head and token (chunk C, key dim K, value dim V): the
    in-chunk products (beta k) k^T and q k^T (2 x 2CK), the two unit-triangular solves
    (C(K + V)), the in-chunk read of the corrected values (2CV), and the state's three
    [K, V] products (W S, q S, k^T v': 6KV); plus the depthwise convolution."""
    o = cfg.gdn
    C, K, V = min(o.chunk, seq_len), o.key_dim, o.value_dim
    per_head = 4 * C * K + C * (K + V) + 2 * C * V + 6 * K * V
    channels = 2 * o.key_heads * K + o.value_heads * V
    return o.value_heads * per_head + 2 * o.conv_kernel * channels


def _attention_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Scores and values of every query head over (T + 1) / 2 keys on average (causal)."""
    return 2 * cfg.gdn.heads(cfg) * cfg.gdn.head_dim(cfg) * (seq_len + 1)


G = Letter(
    symbol="G",
    mixer=GatedDeltaNet,
    tp_plan=PLAN["G"],
    hf_export=EXPORTS["G"],
    mixing_flops=_delta_flops,
    doc=LetterDoc(
        description="Gated DeltaNet (Qwen3.5's linear layer)",
        sequence_parallel=(
            "state passing (parallel/gated_delta.py): each rank's [K, K] transition and [K, V] "
            "local state from one augmented chunked pass, one all-gather (bytes independent "
            "of the sequence length), a prefix combine cut at document starts; the conv's "
            "K - 1 token halo"
        ),
        decode_state=(
            "the last conv_kernel - 1 inputs of the convolution and the [K, V] state per value "
            "head (constant size)"
        ),
        release=f"Qwen3_5GatedDeltaNet ({RELEASE})",
        differs_from_release=(
            "none in function; q, k, v projections and conv weights kept apart (the release "
            "fuses them; the native export re-fuses); documents restart the state and the "
            "conv (the release's PyTorch path has no packed documents)"
        ),
    ),
)

Q = Letter(
    symbol="Q",
    mixer=GatedAttention,
    tp_plan=PLAN["Q"],
    hf_export=EXPORTS["Q"],
    mixing_flops=_attention_flops,
    zigzag=True,
    selective_recompute=True,
    doc=LetterDoc(
        description="Qwen3.5's gated softmax attention",
        sequence_parallel=(
            "as A: LASP-2H (all-gather K and V, repeated over the grouped heads) or Ring "
            "Attention, as parallel.softmax_sp says"
        ),
        decode_state="keys and values of the key/value heads of every previous token",
        release=f"Qwen3_5Attention ({RELEASE})",
        differs_from_release=(
            "none in function; q/k norm weights stored as 1 + the release's zero-centred ones"
        ),
    ),
)

FAMILY = Family(
    name="gdn",
    description="Gated DeltaNet hybrids as released in Qwen3.5 (G linear layers, Q attention)",
    letters=(G, Q),
    options=GdnOptions,
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="gdn-1b",
    native=NATIVE,
)
