"""H3 (Fu et al., 2023): shift + diagonal state-space layers with multiplicative gates, letter
``H``, mixed with softmax attention ``A`` at the published positions."""

from pathlib import Path

from plait.models.common.family import Family, Letter, LetterDoc, fft_conv_flops

from .config import H3Options
from .hf_export import EXPORTS
from .mixer import H3
from .presets import PRESETS
from .tp_plan import PLAN


def _mixing_flops(cfg, layer_idx: int, seq_len: int) -> float:
    """Two convolutions by FFT (the shift SSM over k's channels, the diagonal SSM over the
    h * head_dim channels of k v^T), the SSM kernel itself (state/2 complex terms per lag and
    channel, amortised over the batch row) and the gates."""
    h, dh, N = cfg.hidden_size, cfg.h3.head_dim, cfg.h3.state_size
    kv = h * dh
    kernel = kv / dh / dh * (N // 2) * 8  # per lag: one complex power and multiply-add
    return fft_conv_flops(h, seq_len) + fft_conv_flops(kv, seq_len) + kernel + 6 * kv


LETTER = Letter(
    symbol="H",
    mixer=H3,
    tp_plan=PLAN["H"],
    hf_export=EXPORTS["H"],
    mixing_flops=_mixing_flops,
    doc=LetterDoc(
        description="H3: shift and diagonal SSMs with multiplicative gates",
        sequence_parallel=(
            "shift SSM: halo of the last state_size - 1 inputs; diagonal SSM: LASP-2-style state "
            "passing (each rank's complex state from zero, one all-gather, prefix combination)"
        ),
        decode_state=(
            "the shift SSM's last state_size - 1 inputs of k and the diagonal SSM's complex state"
            " [h * head_dim, state_size / 2]"
        ),
        release=(
            "HazyResearch/H3's H3 layer: shift SSM per channel, S4D-Lin diagonal SSM discretised "
            "bilinearly (h3.discretisation: zoh is the S4D paper's), float32 convolutions and "
            "readout"
        ),
        differs_from_release=(
            "the SSMs' B vectors are folded into C (the kernels depend on C * B only; export "
            "writes B = 1 and e_1, import folds a trained B); readout channels (h d) as the "
            "release's fused CUDA path, the export permutes to its Python path's (d h)"
        ),
    ),
)

FAMILY = Family(
    name="h3",
    description="H3 hybrids: shift and diagonal SSMs, softmax attention at a few layers",
    letters=(LETTER,),
    options=H3Options,
    hf_code=Path(__file__).with_name("hf_mixer.py"),
    presets=PRESETS,
    one_b="h3-1.3b",
)
