"""Gated DeltaNet (``G``) and Qwen3.5's attention (``Q``) in plait's own HF layout
(hf_mixer.py's modules): the tensors keep plait's names, one to one. The native
``Qwen3_5ForCausalLM`` layout (fused in_proj_qkv and conv, zero-centred norms) is
qwen35.py's."""

from __future__ import annotations

from plait.models.common.hf_export import LetterExport, State


def _same(s: State, cfg, i) -> State:
    return dict(s)


EXPORTS = {
    "G": LetterExport(_same, _same, hf_class="GatedDeltaNet"),
    "Q": LetterExport(_same, _same, hf_class="GatedAttention"),
}
