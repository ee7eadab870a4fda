"""MoH (Jin et al., 2024): Mixture-of-Head attention, letter ``M``."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc

from .config import MoHOptions
from .hf_export import EXPORTS
from .mixer import MoHAttention
from .presets import PRESETS
from .tp_plan import PLAN


def _mixing_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Causal attention of the heads each token runs (every shared head and its top-k routed
    ones) over (T + 1) / 2 keys on average; unselected heads are skipped."""
    active = cfg.moh.shared_heads + cfg.moh.top_k
    return 2 * cfg.head_dim * active * (seq_len + 1)


LETTER = Letter(
    symbol="M",
    mixer=MoHAttention,
    tp_plan=PLAN["M"],
    hf_export=EXPORTS["M"],
    mixing_flops=_mixing_flops,
    selective_recompute=True,
    doc=LetterDoc(
        description="mixture-of-head attention (MoH)",
        sequence_parallel=(
            "keys and values all-gathered (LASP-2H's scheme, whatever parallel.softmax_sp says) "
            "for the routed heads' selected queries; balance statistics averaged over the ranks "
            "(SequenceParallel.mean)"
        ),
        decode_state=(
            "keys and values of every previous token for every head (a routed head skips queries,"
            " not keys)"
        ),
        release=(
            "SkyworkAI/MoH's ViT/DiT attention (learned shared/routed/mix routers, the released "
            "gate factors and balance loss); moh.router: query_norm is MoH-LLaMA3's parameter-"
            "free router"
        ),
        differs_from_release=(
            "no q/k/v/out biases (ViT/DiT have them; LLaMA-style here); router init N(0, "
            "init_std) (DiT: xavier-uniform); routing in float32; unselected queries skipped "
            "(same function); no grouped-query attention for the MoH-LLaMA3 form"
        ),
    ),
)

FAMILY = Family(
    name="moh",
    description="MoH: shared and top-k routed attention heads with a balance loss",
    letters=(LETTER,),
    options=MoHOptions,
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="moh-1b",
)
