"""Mamba-2 (``D``) and Bamba's attention (``R``) in plait's own HF layout (hf_mixer.py's
modules): the tensors keep plait's names, one to one. The native ``BambaForCausalLM``
layout (fused in_proj and conv) is bamba.py's."""

from __future__ import annotations

from plait.models.common.hf_export import LetterExport, State


def _same(s: State, cfg, i) -> State:
    return dict(s)


EXPORTS = {
    "D": LetterExport(_same, _same, hf_class="Mamba2Mixer"),
    "R": LetterExport(_same, _same, hf_class="GroupedAttention"),
}
