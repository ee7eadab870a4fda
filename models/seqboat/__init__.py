"""SeqBoat (Ren et al., 2023): sparse modular activation of a GAU by a learned router over a
multi-head EMA, letter ``S``."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc, fft_conv_flops

from .config import SeqBoatOptions
from .hf_export import EXPORTS
from .mixer import SeqBoat
from .presets import PRESETS
from .tp_plan import PLAN


def _mixing_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """The EMA as a convolution by FFT, and, as an upper bound with every token active (the
    router's budget is learned), the GAU's local attention: ``window`` keys per query, fewer
    when the sequence is shorter than twice the window (on average (T + 1) / 2 causally)."""
    o = cfg.seqboat
    keys = min(o.window, (seq_len + 1) / 2)
    attention = 2 * (o.zdim + o.value_dim(cfg.hidden_size)) * keys
    return fft_conv_flops(cfg.hidden_size, seq_len) + attention


LETTER = Letter(
    symbol="S",
    mixer=SeqBoat,
    tp_plan=PLAN["S"],
    hf_export=EXPORTS["S"],
    mixing_flops=_mixing_flops,
    selective_recompute=True,
    doc=LetterDoc(
        description="SeqBoat: EMA + router + GAU on the active tokens",
        sequence_parallel=(
            "EMA: a halo of the truncated kernel's length, or the gathered prefix when it is "
            "longer than a rank's chunk (exact long convolution); attention: every rank's active "
            "keys and values all-gathered (bytes proportional to the active tokens), each rank "
            "attending over the global compressed chunk before its first active token"
        ),
        decode_state=(
            "the EMA's last ema_truncation - 1 inputs (its state [hidden, ema_dim] when "
            "untruncated) and the keys and values of the last window - 1 active tokens"
        ),
        release=(
            "renll/SeqBoat's SeqBoatUnit as its LM runs it (causal, local, rotary, softmax): v "
            "from the EMA output, biases on every projection, an exact window of seqboat.window "
            "compressed keys (the released chunk 1024 is 1025), the EMA kernel cut at 2048 taps, "
            "the released truncated-normal inits and learned router temperature"
        ),
        differs_from_release=(
            "the block adds SiLU(hx + g h) to x (the release: SiLU(x + hx + g h)); compression "
            "per row (the release skips it for the whole batch when any row is fully active: the "
            "same at batch 1, its setting); documents reset the EMA, attention and positions; no "
            "dropout; rotary on halves (the export permutes z's channels to the release's "
            "interleaved pairs); the final norm keeps its affine; embeddings start N(0, init_std)"
            " (the release: N(0, hidden^-1/2), before its sqrt(hidden) scale)"
        ),
    ),
)

FAMILY = Family(
    name="seqboat",
    description="SeqBoat: EMA, a learned router, GAU attention on the active tokens only",
    letters=(LETTER,),
    options=SeqBoatOptions,
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="seqboat-1b",
)
