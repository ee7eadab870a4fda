"""The native-export check both released-class families run (test_gdn.py, test_mamba2.py):
a perturbed tiny preset converted to the release's layout (config.json + safetensors) and
loaded by transformers in a fresh interpreter that cannot import plait; its logits and its
cached and uncached greedy generations come back beside plait's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

from tests.distributed import run_distributed

# Runs in a fresh interpreter without site processing (site-packages added by hand): the
# editable install that makes plait importable never runs.
HF_SIDE = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("plait") is None, "plait is importable"
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).eval()
model.generation_config.eos_token_id = None
ids = torch.tensor(json.load(open(sys.argv[3])))
with torch.no_grad():
    out = {"class": type(model).__name__, "logits": model(ids).logits}
    prompt = ids[:1, :20]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    out["cached"] = model.generate(prompt, use_cache=True, **kw)
    out["uncached"] = model.generate(prompt, use_cache=False, **kw)
torch.save(out, sys.argv[4])
"""


def perturb_release(model, seed: int):
    """Every weight of a freshly built release model moved off its init (norms, decays and
    skips included, so that no convention hides behind an init value); returns it in eval."""
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    return model.eval()


def plait_model(cfg, state):
    """A single-process plait model holding a converted full state."""
    from plait.models.common import build_model
    from plait.parallel.tensor_parallel import load_full_state

    model = build_model(cfg, 1, vocab_size=state["embedding.weight"].shape[0]).eval()
    load_full_state(model, state)
    return model


def _export_side(rt, directory: str, preset: str, layout, vocab: int, tokens: torch.Tensor):
    from safetensors.torch import save_file

    from plait.models.common import build_model
    from plait.models.presets import get_preset
    from plait.parallel.tensor_parallel import gather_full
    from tests.models.test_decode import perturb

    torch.manual_seed(5)
    cfg = get_preset(preset)
    model = build_model(cfg, 1, vocab_size=vocab).eval()
    perturb(model, 5)
    state = gather_full(model)
    rows = state["embedding.weight"].shape[0]
    save_file({k: v.contiguous() for k, v in layout.to_hf(state, cfg).items()},
              str(Path(directory) / "model.safetensors"))
    (Path(directory) / "config.json").write_text(json.dumps(layout.config_to_hf(cfg, rows)))
    with torch.no_grad():
        return model(tokens), model.greedy(tokens[:1, :20], 12)


def load_natively(tmp_path: Path, preset: str, layout, vocab: int) -> dict:
    """Export ``preset`` (perturbed) in ``layout`` (a NativeLayout) and load it without
    plait: {"hf": transformers' results, "logits": plait's, "greedy": plait's 12 tokens}."""
    tokens = torch.randint(0, vocab, (2, 45), generator=torch.Generator().manual_seed(0))
    logits, greedy = run_distributed(_export_side, 1, str(tmp_path), preset, layout, vocab,
                                     tokens)[0]
    (tmp_path / "tokens.json").write_text(json.dumps(tokens.tolist()))
    (tmp_path / "hf_side.py").write_text(HF_SIDE)
    cmd = [sys.executable, "-I", "-S", str(tmp_path / "hf_side.py"),
           sysconfig.get_paths()["purelib"], str(tmp_path), str(tmp_path / "tokens.json"),
           str(tmp_path / "out.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"hf": torch.load(tmp_path / "out.pt"), "logits": logits, "greedy": greedy}


def assert_native_equal(got: dict, architecture: str) -> None:
    """The loaded class is the release's; its logits equal plait's (max abs 1e-4) and its
    cached greedy generation equals its uncached one and plait's."""
    out = got["hf"]
    assert out["class"] == architecture
    assert (out["logits"] - got["logits"][..., : out["logits"].shape[-1]]).abs().max() < 1e-4
    assert torch.equal(out["cached"], out["uncached"])
    assert torch.equal(out["cached"][:, 20:], got["greedy"])
