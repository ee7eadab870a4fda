"""The HF modeling code (each family's hf_mixer.py with models/common/hf_modeling, as an export
assembles it) computes what plait computes, letter by letter: every registered letter.

For one-letter models (and the all-letters model and every family's tiny preset) with
perturbed weights: plait's full weights mapped by ``to_hf`` load into ``PlaitForCausalLM``
with ``strict=True``; its logits equal plait's forward (fp32, max abs <= 1e-4); prefill then
decode steps equal its own full forward (rel 1e-5); a left-padded batch gives each row the
logits and the greedy ``generate()`` of that row alone; and ``generate()`` equals plait's own
greedy decode token for token. (tests/export/test_export.py checks the same through real
exports loaded by transformers in a process that cannot import plait.)
"""

from __future__ import annotations

import sys

import pytest
import torch

from plait.launcher.convert import model_fields
from plait.models.common import build_model, hf_code
from plait.models.common.family import letters
from plait.models.common.hf_export import to_hf
from plait.parallel.tensor_parallel import gather_full
from tests.distributed import run_distributed
from tests.helpers import assert_rel_close
from tests.models.test_decode import TINY, VOCAB, _config, perturb


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """The modeling code an export of each case ships, assembled from the families and
    imported as transformers would import it (a package of its own per pattern)."""
    made = {}

    def load(pattern: str):
        if pattern not in made:
            d = tmp_path_factory.mktemp("hf_code")
            hf_code.write_code(d, pattern)
            made[pattern] = hf_code.load_code(d)
        return made[pattern]

    return load


def _plait(rt, name: str, seed: int, tokens: torch.Tensor, prompt: int, new: int):
    torch.manual_seed(seed)
    cfg = _config(name)
    model = build_model(cfg, 1, vocab_size=VOCAB).eval()
    perturb(model, seed)
    with torch.no_grad():
        logits = model(tokens)
        greedy = model.greedy(tokens[:, :prompt], new)
    return gather_full(model), logits, greedy


def hf_model(code, name: str, state: dict):
    cfg = _config(name)
    modeling = code(cfg.pattern)
    config_cls = sys.modules[modeling.__package__ + ".configuration_plait"].PlaitConfig
    vocab = state["embedding.weight"].shape[0]
    config = config_cls(**model_fields(cfg, vocab), pad_token_id=0, eos_token_id=1)
    model = modeling.PlaitForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # plait's greedy does not stop at an eos
    hf = to_hf(state, cfg)
    if cfg.tie_embeddings:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
    model.load_state_dict(hf, strict=True)
    return model


CASES = sorted(letters()) + ["mixed", "variants"] + TINY


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_hf_letter_equals_plait(code, name, seed):
    g = torch.Generator().manual_seed(seed)
    T, prompt, new = 40, 13, 8
    tokens = torch.randint(0, VOCAB, (2, T), generator=g)
    state, logits, greedy = run_distributed(_plait, 1, name, seed, tokens, prompt, new)[0]
    model = hf_model(code, name, state)
    with torch.no_grad():
        out = model(tokens).logits
        err = (out - logits).abs().max().item()
        assert err <= 1e-4, f"{name}: HF logits differ from plait's by {err:.2e}"

        # prefill + single steps + a chunk equal the full forward
        first = model(tokens[:, :prompt], use_cache=True)
        cache, parts = first.past_key_values, [first.logits]
        mid = prompt + 5
        step = model(tokens[:, prompt:mid], past_key_values=cache, use_cache=True)
        parts.append(step.logits)
        for t in range(mid, T):
            step = model(tokens[:, t : t + 1], past_key_values=step.past_key_values,
                         use_cache=True)
            parts.append(step.logits)
        assert_rel_close(torch.cat(parts, 1), out, 1e-5, f"{name}: HF decode vs forward")

        # generate() equals plait's greedy decode
        gen = model.generate(tokens[:, :prompt], max_new_tokens=new, do_sample=False,
                             attention_mask=torch.ones(2, prompt, dtype=torch.long))
        assert torch.equal(gen[:, prompt:], greedy), f"{name}: generate() != plait greedy"

        # a left-padded batch: each row as if alone
        short = 9
        ids = tokens[:, :prompt].clone()
        mask = torch.ones_like(ids)
        ids[0, : prompt - short] = 0
        mask[0, : prompt - short] = 0
        padded = model(ids, attention_mask=mask).logits
        alone = model(tokens[:1, prompt - short : prompt]).logits
        assert_rel_close(padded[:1, prompt - short :], alone, 1e-5, f"{name}: left padding")
        assert_rel_close(padded[1:], out[1:, :prompt], 1e-5, f"{name}: unpadded row")
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        alone_ids = tokens[:1, prompt - short : prompt]
        gen_alone = model.generate(alone_ids, attention_mask=torch.ones_like(alone_ids),
                                   max_new_tokens=new, do_sample=False)
        assert torch.equal(gen[0, prompt:], gen_alone[0, short:]), f"{name}: padded generate"
