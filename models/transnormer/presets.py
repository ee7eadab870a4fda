"""TransNormerLLM presets: the released sizes and a tiny CPU one.

Released configs (OpenNLPLab's TransnormerConfig): 385M is the default config (d 1024, 24
layers, 8 heads, GLU 2816, vocab 64000); 1B is d 2048, 16 layers, 16 heads, GLU 5632. SGLU
channel mixer, SRMSNorm everywhere, embeddings scaled by sqrt(d), LRPE on the first layer
only (``linear_use_lrpe_list`` [1, 0, ...]), full-width output norm, tied embeddings (the
HF default; the untied count is in docs/models.md).
"""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset


def transnormer(d: int, layers: int, heads: int, glu: int, vocab: int = 64000) -> ModelConfig:
    return ModelConfig(
        pattern="L" * layers,
        num_layers=layers,
        hidden_size=d,
        num_heads=heads,
        ffn_hidden_size=glu,
        mlp="glu",
        norm="srmsnorm",
        vocab_size=vocab,
        tie_embeddings=True,
        lightning_norm="full",
        lrpe="first",
        embed_scale=True,
    )


PRESETS = {
    "transnormer-385m": Preset(
        lambda: transnormer(1024, 24, 8, 2816),
        385e6,
        "released default config",
        "the name: the released config gives 399.0M tied (464.5M untied); 385M matches no "
        "embedding convention of it",
    ),
    "transnormer-1b": Preset(
        lambda: transnormer(2048, 16, 16, 5632),
        1e9,
        "released; the 1B-class preset",
        "the name is rounded: the released config gives 1.02B tied",
    ),
    "transnormer-25m": Preset(
        lambda: transnormer(512, 7, 8, 1408, vocab=0), None, "benchmarks/train_step.py"
    ),
    "transnormer-tiny": Preset(lambda: transnormer(64, 4, 4, 128, vocab=0), None, "CPU tests"),
}
