"""The decode form of every letter (family.py's contract): a prompt prefilled, then continued
one token at a time and by a chunk, gives the logits of the full forward over the whole
sequence (fp32, relative error <= 1e-5); and greedy decoding equals the argmax of full
forwards token by token.

The configs are small but reach every state a letter keeps: windows and EMA truncation
shorter than the sequence, LRPE on, SeqBoat with its learned router. Every parameter is
perturbed away from its init (biases and gates start at 0 or 1) so that none can hide.
"""

from __future__ import annotations

import pytest
import torch

from plait.models.common import ModelConfig, build_model
from plait.models.common.family import letters
from plait.models.presets import get_preset
from plait.models.registry import SHIPPED
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close

VOCAB = 96
TINY = [f"{f.name}-tiny" for f in SHIPPED if f.letters and f.presets]


def letter_config(pattern: str) -> ModelConfig:
    """Small sizes with every state boundary inside a 40-token sequence."""
    cfg = ModelConfig(pattern=pattern, num_layers=len(pattern), hidden_size=32, num_heads=4,
                      ffn_hidden_size=64, lrpe="first", lightning_norm="full",
                      lightning_block=8)
    cfg.h3.state_size = 8
    cfg.seqboat.zdim, cfg.seqboat.window, cfg.seqboat.ema_truncation = 8, 6, 12
    cfg.moh.shared_heads = 2
    cfg.based.window = 7
    return cfg


def _config(name: str) -> ModelConfig:
    if name in letters():
        return letter_config(name * 2)
    if name == "mixed":
        return letter_config("LABWCHSM")
    if name == "variants":  # the non-default options of every letter that has some
        cfg = letter_config("LAWMHS")
        cfg.lrpe, cfg.lightning_norm = "all", "head"
        cfg.softmax.bias, cfg.softmax.rotary_dim = True, 4
        cfg.moh.router, cfg.h3.discretisation, cfg.h3.head_dim = "query_norm", "zoh", 2
        cfg.seqboat.ema_truncation, cfg.seqboat.bias = 0, False
        return cfg
    return get_preset(name)


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every parameter off its init; SeqBoat's q/k scale and offset (init ~0.02 and 0)
    to O(1), or its attention is near uniform and positions could be wrong unseen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("qk_gamma", "qk_beta")):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def _decode_vs_forward(rt, name: str, seed: int, prompt: int, total: int):
    torch.manual_seed(seed)
    cfg = _config(name)
    model = build_model(cfg, 1, vocab_size=VOCAB).eval()
    perturb(model, seed)
    tokens = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        full = model(tokens)
        first, cache = model.decode(tokens[:, :prompt])
        steps = [first]
        for t in range(prompt, total):
            logits, cache = model.decode(tokens[:, t : t + 1], cache)
            steps.append(logits)
        stepped = torch.cat(steps, 1)
        # a chunk of several tokens after a state, then single steps again
        mid = prompt + (total - prompt) // 2
        a, cache = model.decode(tokens[:, :prompt])
        b, cache = model.decode(tokens[:, prompt:mid], cache)
        c, _ = model.decode(tokens[:, mid:], cache)
        chunked = torch.cat((a, b, c), 1)
        greedy = model.greedy(tokens[:, :prompt], 6)
        seq = tokens[:, :prompt]
        for _ in range(6):
            seq = torch.cat((seq, model(seq)[:, -1].argmax(-1, keepdim=True)), 1)
    return full, stepped, chunked, greedy, seq[:, prompt:]


@pytest.mark.parametrize("name", sorted(letters()) + ["mixed", "variants"] + TINY)
@pytest.mark.parametrize("seed", [0, 1])
def test_decode_equals_forward(name, seed):
    full, stepped, chunked, greedy, reference = run_distributed(
        _decode_vs_forward, 1, name, seed, 13, 40
    )[0]
    assert_rel_close(stepped, full, 1e-5, f"{name}: prefill + steps")
    assert_rel_close(chunked, full, 1e-5, f"{name}: prefill + chunk + steps")
    assert torch.equal(greedy, reference), f"{name}: greedy decode differs from full forwards"
