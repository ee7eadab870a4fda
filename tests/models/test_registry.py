"""The family registry is open and the import graph of models/ has no cycle.

A toy family defined in this folder (toy_family.py) registers itself, gets an options
section, presets, TP plan, HF export, SP form and an auxiliary loss, and trains through the
normal CLI at TP=2 without any edit of plait. It is only ever imported in forked ranks and
subprocesses, so the pytest process (and every other test's view of the registry) never
sees its letter.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from plait.launcher.config import ConfigError, load_config
from plait.models.common import Family, ModelConfig, build_model, letter, param_count
from plait.models.common.family import RegistryError, families, family_of, letters, register
from plait.models.common.hf_export import from_hf, to_hf
from plait.models.common.tp_plan import check_plan
from plait.models.presets import get_preset
from plait.models.registry import SHIPPED
from plait.parallel.config import ParallelConfig
from plait.parallel.tensor_parallel import gather_full, logical_numel
from tests.distributed import run_distributed
from tests.helpers import assert_tp_equal, tp_forward_backward

REPO = Path(__file__).resolve().parents[2]


def test_every_letter_declares_every_hook():
    from plait.models.common.family import MIXER_METHODS, Mixer

    for symbol, lt in letters().items():
        assert lt.symbol == symbol and lt.doc.description and lt.doc.decode_state
        assert lt.doc.sequence_parallel and lt.hf_export.hf_class
        for method in MIXER_METHODS:
            assert callable(getattr(lt.mixer, method, None)), (symbol, method)
    protocol = {n for n in vars(Mixer) if not n.startswith("_")} | {"forward"}
    assert set(MIXER_METHODS) == protocol  # the check and the declared protocol agree
    assert [s for s, lt in letters().items() if lt.zigzag] == ["A", "Q", "R"]  # the softmax ones


def test_registering_a_mixer_without_the_protocol_fails():
    import dataclasses

    class NoDecode(letter("L").mixer):
        decode = None

    lt = dataclasses.replace(letter("L"), symbol="V", mixer=NoDecode)
    with pytest.raises(RegistryError, match="has no decode"):
        register(Family("q", "", (lt,), hf_code=family_of("L").hf_code))
    lt = dataclasses.replace(letter("L"), symbol="V",
                             hf_export=dataclasses.replace(letter("L").hf_export, hf_class="Nope"))
    with pytest.raises(RegistryError, match="'Nope' is not a class of"):
        register(Family("q", "", (lt,), hf_code=family_of("L").hf_code))


def test_registry_refuses_clashes():
    with pytest.raises(RegistryError, match="letter L is already transnormer's"):
        register(Family("other", "", (letter("L"),)))
    with pytest.raises(RegistryError, match="already registered"):
        register(Family("moh", "", ()))

    def again(rt):
        import tests.models.toy_family as toy

        return register(toy.FAMILY) is toy.FAMILY  # the same record again: a no-op

    assert run_distributed(again, 1)[0]
    assert "X" not in letters()


def test_cost_estimates_separate_softmax_from_linear_letters():
    """The pipeline balancer's input: softmax attention grows with the sequence, lightning,
    Based, H3 and the window letters do not (H3 and SeqBoat only by the FFT's log factor)."""
    cfg = ModelConfig(pattern="LABWCHSM", num_layers=8, hidden_size=512, num_heads=8)
    cfg.moh.shared_heads, cfg.moh.top_k = 2, 2  # 4 of 8 heads per token
    cost = {c: [letter(c).cost(cfg, i, T) for T in (2048, 32768)] for i, c in enumerate("LABWCHSM")}
    for c in "LBWC":
        assert cost[c][1] == pytest.approx(cost[c][0]), c
    for c in "HS":
        assert cost[c][1] < 1.5 * cost[c][0], c
    assert cost["A"][1] > 5 * cost["A"][0]
    assert cost["A"][1] > 10 * cost["L"][1]
    assert cost["M"][1] < cost["A"][1]  # routed heads skip queries


def _toy_tp(rt, full_state, seed):
    import tests.models.toy_family  # noqa: F401  (registers "toy")

    model = build_model(get_preset("toy-tiny"), rt.tp, vocab_size=90)
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 90, (2, 30), generator=g)
    out = tp_forward_backward(model, full_state, tokens[:, :-1], tokens[:, 1:])
    out["plan"] = check_plan(model, model.cfg)
    out["metrics"] = sorted(model.metrics)
    if rt.tp == 1:
        state = gather_full(model)
        out["roundtrip"] = all(
            torch.equal(state[k], v) for k, v in from_hf(to_hf(state, model.cfg), model.cfg).items()
        )
        out["counts"] = (logical_numel(model), param_count(model.cfg, 90))
    return out


def test_toy_family_builds_at_tp2_like_tp1():
    ref = run_distributed(_toy_tp, 1, None, 0, seed=0)[0]
    assert ref["roundtrip"] and ref["counts"][0] == ref["counts"][1]
    assert "toy_gate_sq" in ref["metrics"]
    for out in run_distributed(
        _toy_tp, 2, ref["state"], 0, parallel=ParallelConfig(tensor_parallel=2), seed=0
    ):
        assert not out["plan"], out["plan"]
        assert_tp_equal(out, ref, "toy")


def test_auxiliary_loss_is_added_in_training_only():
    def run(rt):
        import tests.models.toy_family  # noqa: F401  (registers "toy")

        model = build_model(get_preset("toy-tiny"), 1, vocab_size=90)
        x = torch.randint(0, 90, (2, 17))
        train = model(x[:, :-1], x[:, 1:])
        parts = {k: v.item() for k, v in model.metrics.items()}
        model.eval()
        val = model(x[:, :-1], x[:, 1:])
        return train.item(), val.item(), parts

    train, val, parts = run_distributed(run, 1)[0]
    assert train == pytest.approx(parts["lm_loss"] + 1e-3 * parts["toy_gate_sq"], rel=1e-6)
    assert val == pytest.approx(parts["lm_loss"], rel=1e-6)
    assert parts["toy_gate_sq"] > 0


def _outside_config(rt, path):
    """The YAML gives fields, then model.families and model.preset; --set gives one more."""
    cfg = load_config(path, ["model.num_heads=8"])
    assert cfg.model.pattern == "XAXA" and cfg.model.preset == "toy-tiny"
    assert cfg.model.toy.kernel == 5 and cfg.model.hidden_size == 48  # given before the preset
    assert cfg.model.num_heads == 8 and cfg.model.num_layers == 4
    assert cfg.to_dict()["model"]["toy"] == {"kernel": 5, "penalty": 1e-3}
    with pytest.raises(ConfigError, match="model.toy: kernel must be >= 1"):
        load_config(path, ["model.toy.kernel=0"])
    with pytest.raises(ConfigError, match="model.families: cannot import no_such_module"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.families=[no_such_module]"])
    return True


def test_config_reads_an_outside_family_and_applies_its_preset_first(tmp_path):
    """model.families imports the toy family; fields given before model.preset still win."""
    path = tmp_path / "toy.yaml"
    path.write_text(
        "model:\n  hidden_size: 48\n  toy:\n    kernel: 5\n"
        "  families: [tests.models.toy_family]\n  preset: toy-tiny\n"
    )
    assert run_distributed(_outside_config, 1, path)[0]


def test_toy_family_trains_through_the_cli_with_tp2(tmp_path):
    out = tmp_path / "toy"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "plait.launcher.train", "--config", "configs/tiny.yaml",
    ]
    sets = [
        f"out_dir={out}", "logging.progress_bar=false", "training.steps=30",
        "training.eval_every=0", "model.families=[tests.models.toy_family]",
        "model.pattern=XAXA", "model.toy.kernel=3", "parallel.tensor_parallel=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + [a for s in sets for a in ("--set", s)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 30
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5]) - 1.0
    assert train[-1]["toy_gate_sq"] > 0
    assert train[-1]["loss"] > train[-1]["lm_loss"]  # the toy's auxiliary loss is in the loss
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["families"] == ["tests.models.toy_family"] and saved["toy"]["kernel"] == 3

    # exported: the family's own HF module ships (mixer_toy.py), the export's self-check
    # passes (transformers without plait reproduces plait's logits and greedy decode), and in
    # a process that cannot import plait its cached generation equals its full forward
    from tests.cli import run_module

    hf = tmp_path / "hf"
    ran = run_module("plait.launcher.export", ["--checkpoint", str(out / "checkpoints"),
                                               "--out", str(hf), "--no-progress"], cwd=REPO)
    assert ran.code == 0, ran.text[-3000:]
    assert "export check: passed" in ran.out
    assert (hf / "mixer_toy.py").read_text() == (REPO / "tests/models/toy_family_hf.py").read_text()
    assert "'X': TokenShift" in (hf / "plait_mixers.py").read_text()
    site = sysconfig.get_paths()["purelib"]
    (tmp_path / "gen.py").write_text(TOY_GENERATES)
    proc = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "gen.py"), site, str(hf)],
                          cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


TOY_GENERATES = r"""
import importlib.util, sys
sys.path.append(sys.argv[1])
assert importlib.util.find_spec("plait") is None, "plait is importable"
import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
model.generation_config.eos_token_id = None
prompt = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences).logits  # no cache: the whole sequence at once
new = out.sequences[:, 16:]
assert torch.equal(full[:, 15:-1].argmax(-1), new), "cached generation != full forward"
steps = torch.stack(out.logits, 1)
err = ((steps - full[:, 15:-1]).abs().max() / full.abs().max()).item()
assert err < 1e-5, err
print("ok", err)
"""


# The import graph of models/ (tests/test_import_cycles.py finds no cycle in all of plait) -------


def test_common_imports_no_family():
    names = set(families())
    bad = []
    from tests.test_import_cycles import import_graph

    for module, deps in import_graph().items():
        if module.startswith("plait.models.common"):
            bad += [
                f"{module} imports {d}" for d in deps
                if d.startswith("plait.models.") and d.split(".")[2] in names | {"registry"}
            ]
    assert not bad, "\n".join(bad)


def test_every_shipped_letter_states_its_release_and_differences():
    """docs/models.md's "differs from the release" column is filled for every letter."""
    for fam in SHIPPED:
        for lt in fam.letters:
            assert lt.doc.release and lt.doc.differs_from_release, lt.symbol
