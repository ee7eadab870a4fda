"""SeqBoat (Ren et al., 2023): sparse modular activation of a GAU by a learned router over a
multi-head EMA, letter ``S``."""

from plait.models.common.family import Family, Letter, SequenceParallelForm, fft_conv_flops
from plait.parallel import convs, softmax

from .config import SeqBoatOptions
from .hf_export import EXPORTS
from .mixer import SeqBoat
from .presets import PRESETS
from .tp_plan import PLAN


def _mixing_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """The EMA as a convolution by FFT, and, as an upper bound with every token active (the
    router's budget is learned), the GAU's local attention: on average 1.5 window keys per
    query (its own chunk causally and the previous chunk)."""
    o = cfg.seqboat
    keys = min(1.5 * o.window, (seq_len + 1) / 2)
    return fft_conv_flops(cfg.hidden_size, seq_len) + 2 * (
        o.zdim + o.value_dim(cfg.hidden_size)
    ) * keys


LETTER = Letter(
    symbol="S",
    description="SeqBoat: EMA + router + GAU on the active tokens",
    mixer=SeqBoat,
    tp_plan=PLAN["S"],
    hf_export=EXPORTS["S"],
    mixing_flops=_mixing_flops,
    sequence_parallel=SequenceParallelForm(
        "EMA: the gathered prefix (exact long convolution); attention: every rank's active "
        "keys and values all-gathered (bytes proportional to the active tokens), each rank "
        "attending over the global compressed chunk before its first active token",
        (convs.long_conv, softmax.active_window),
    ),
    decode_state="the EMA's state [hidden, ema_dim] and the keys and values of the active "
    "tokens in the current and previous compressed chunk",
)

FAMILY = Family(
    name="seqboat",
    description="SeqBoat: EMA, a learned router, GAU attention on the active tokens only",
    letters=(LETTER,),
    options=SeqBoatOptions,
    presets=PRESETS,
    one_b="seqboat-1b",
)
