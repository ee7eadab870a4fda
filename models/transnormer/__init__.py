"""TransNormerLLM (Qin et al., 2023): lightning attention with decay + SGLU, letter ``L``."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc

from .hf_export import EXPORTS
from .mixer import LightningAttention
from .presets import PRESETS
from .tp_plan import PLAN


def _mixing_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Chunked lightning attention: causal attention inside blocks of ``lightning_block``
    tokens, plus the state read-out and update ([d_qk, d_v] per head) for every token;
    constant in the sequence length."""
    d = cfg.head_dim
    dqk = 2 * d if LightningAttention.has_lrpe(cfg, layer_idx) else d
    block = min(cfg.lightning_block, seq_len)
    return cfg.num_heads * ((dqk + d) * (block + 1) + 4 * dqk * d)


L = Letter(
    symbol="L",
    mixer=LightningAttention,
    tp_plan=PLAN["L"],
    hf_export=EXPORTS["L"],
    mixing_flops=_mixing_flops,
    doc=LetterDoc(
        description="lightning linear attention with decay (TransNormerLLM)",
        sequence_parallel=(
            "LASP-2: each rank computes the [d, d] state per head its chunk hands on, one all-"
            "gather of those states (bytes independent of the sequence length), a prefix "
            "combination with the decay; documents may cross rank borders"
        ),
        decode_state="per head the [d, d] linear-attention state, decayed every token",
        release=(
            "OpenNLPLab/TransNormerLLM's HF modeling code (lightning attention with per-head "
            "decay, LRPE on the first layer, SRMSNorm, SGLU)"
        ),
        differs_from_release="none in function (logits equal to 1.5e-7 with copied weights)",
    ),
)

FAMILY = Family(
    name="transnormer",
    description="TransNormerLLM: lightning attention with decay, LRPE, SRMSNorm, SGLU",
    letters=(L,),
    options=None,  # its options (lightning_norm, lrpe, lightning_block) are model fields
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="transnormer-1b",
)
