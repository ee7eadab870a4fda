"""MoH presets: LLaMA-style LMs whose attention is MoH with the paper's learned routers
(SkyworkAI/MoH's ViT/DiT code: shared-head and routed-head routers, a 2-way mix, the balance
loss, the released gate factors) and 75% of the heads active per token: a quarter shared,
top-k of the routed ones. The names are sizes, not released checkpoints. MoH-LLaMA3 (the
released LM, a fine-tune of LLaMA3-8B) routes differently: ``moh.router: query_norm`` with
half the heads shared and a quarter selected (``moh.shared_heads = heads / 2``, ``moh.top_k
= heads / 4``) is its router; its grouped-query attention (8 KV heads) is not in plait."""

from __future__ import annotations

from plait.models.common.config import ModelConfig
from plait.models.common.presets import Preset

from .config import MoHOptions


def moh(d: int, layers: int, heads: int, vocab: int = 32000) -> ModelConfig:
    shared = heads // 4
    return ModelConfig(
        pattern="M" * layers,
        num_layers=layers,
        hidden_size=d,
        num_heads=heads,
        mlp="swiglu",
        norm="rmsnorm",
        vocab_size=vocab,
        tie_embeddings=False,
        options={
            "moh": MoHOptions(shared_heads=shared, top_k=heads * 3 // 4 - shared, balance_coef=0.01)
        },
    )


def _tiny() -> ModelConfig:
    return moh(64, 3, 8, vocab=0)  # 2 shared + top-4 of 6 routed heads


PRESETS = {
    "moh-360m": Preset(lambda: moh(1024, 24, 16), None, "comparable to Based 360M"),
    "moh-1b": Preset(lambda: moh(2048, 18, 16), None, "the 1B-class preset"),
    "moh-25m": Preset(lambda: moh(512, 7, 8, vocab=0), None, "benchmarks/train_step.py"),
    "moh-tiny": Preset(_tiny, None, "CPU tests"),
}
