"""The family registry is open and the import graph of models/ has no cycle.

A toy family defined in this folder (toy_family.py) registers itself, gets an options
section, presets, TP plan, HF export, SP form and an auxiliary loss, and trains through the
normal CLI at TP=2 without any edit of plait. It is only ever imported in forked ranks and
subprocesses, so the pytest process (and every other test's view of the registry) never
sees its letter.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.launcher.config import ConfigError, load_config
from plait.models.common import Family, ModelConfig, build_model, letter, param_count
from plait.models.common.family import RegistryError, families, letters, register
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
    for symbol, lt in letters().items():
        assert lt.symbol == symbol and lt.description and lt.decode_state
        assert lt.sequence_parallel.scheme and lt.sequence_parallel.operators
        for op in lt.sequence_parallel.operators:
            assert op.__module__.startswith("plait.parallel."), (symbol, op)
        assert hasattr(lt.mixer, "param_count")
    assert [s for s, lt in letters().items() if lt.sequence_parallel.zigzag] == ["A"]


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
    ]  # fmt: skip
    sets = [
        f"out_dir={out}", "logging.progress_bar=false", "training.steps=30",
        "training.eval_every=0", "model.families=[tests.models.toy_family]",
        "model.pattern=XAXA", "model.toy.kernel=3", "parallel.tensor_parallel=2",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + [a for s in sets for a in ("--set", s)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 30
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5]) - 1.0
    assert train[-1]["toy_gate_sq"] > 0
    assert train[-1]["loss"] > train[-1]["lm_loss"]  # the toy's auxiliary loss is in the loss
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["families"] == ["tests.models.toy_family"] and saved["toy"]["kernel"] == 3


# The import graph of models/ ---------------------------------------------------------------


def _explicit_imports(path: Path, module: str, is_package: bool):
    """Modules this file imports by name (function-local imports included, those under
    ``if TYPE_CHECKING:`` left out: they never run). A package's implicit import of its
    parent is not an edge: Python runs a package's __init__ before its submodules, and a
    submodule importing a sibling through it is the ordinary case."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skip.update(id(n) for n in ast.walk(node))
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{root}.{base}" if base else root
            if not (module == base or module.startswith(base + ".")):  # not an ancestor
                yield base
            for a in node.names:  # from pkg import submodule
                yield f"{base}.{a.name}"


def _models_graph() -> dict[str, set[str]]:
    files = {}
    for path in (REPO / "models").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        parts = ["plait", *rel.parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        files[".".join(parts)] = (path, is_package)
    graph = {}
    for module, (path, is_package) in files.items():
        graph[module] = {m for m in _explicit_imports(path, module, is_package) if m in files}
        graph[module].discard(module)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_models():
    graph = _models_graph()
    assert len(graph) > 30 and "plait.models.common.family" in graph["plait.models.common.config"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_common_imports_no_family():
    names = set(families())
    bad = []
    for module, deps in _models_graph().items():
        if module.startswith("plait.models.common"):
            bad += [
                f"{module} imports {d}" for d in deps if d.split(".")[2] in names | {"registry"}
            ]
    assert not bad, "\n".join(bad)


def test_every_shipped_letter_states_its_release_and_differences():
    """docs/models.md's "differs from the release" column is filled for every letter."""
    for fam in SHIPPED:
        for lt in fam.letters:
            assert lt.release and lt.differs_from_release, lt.symbol
