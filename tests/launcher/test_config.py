"""Config loading: YAML + --set overrides, and errors that name the source and the field."""

from pathlib import Path

import pytest

from plait.launcher.config import ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert len(cfg.model.pattern) == cfg.model.num_layers


def test_overrides_are_typed():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "training.steps=7",
            "optimizer.lr=1e-3",
            "model.pattern=LLLA",
            "model.tie_embeddings=false",
            "optimizer.name=adamw",
        ],
    )
    assert cfg.training.steps == 7
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.pattern == "LLLA"
    assert cfg.model.tie_embeddings is False
    assert cfg.optimizer.name == "adamw"


@pytest.mark.parametrize(
    "text,needle",
    [
        (
            "model:\n  pattern: LAZL\n",
            "model.pattern: 'LAZL' has unknown letter(s) ['Z']; allowed: A (causal softmax",
        ),
        ("model:\n  pattern: LAL\n", "model.pattern: 'LAL' has 3 letters but num_layers is 4"),
        ("model:\n  hiden_size: 64\n", "unknown field 'model.hiden_size'"),
        (
            "optimizer:\n  name: sgd\n",
            "optimizer.name: 'sgd' is not one of the allowed values 'lamb', 'adamw'",
        ),
        (
            "parallel:\n  zero_stage: 5\n",
            "parallel.zero_stage: 5 is not one of the allowed values 0, 1, 2, 3",
        ),
        ("training:\n  steps: many\n", "training.steps: expected an integer, got 'many'"),
        ("training:\n  precision: fp16\n", "training.precision: 'fp16' is not one of the allowed"),
        (
            "model:\n  hidden_size: 100\n  num_heads: 3\n",
            "model.num_heads: hidden_size 100 is not divisible by 3",
        ),
        ("optimizer:\n  lr: 1e-4\n  min_lr: 1e-3\n", "optimizer.min_lr: 0.001 is above lr 0.0001"),
        ("model: 3\n", "model: expected a mapping"),
        ("model:\n  preset: gpt-9\n", "model.preset: 'gpt-9' is not one of bamba-9b, based-1.3b"),
        (
            "model:\n  preset: moh-tiny\n  moh:\n    top_k: 9\n",
            "model.moh: shared_heads 2 + top_k 9 exceeds num_heads 8",
        ),
        ("model:\n  h3:\n    state_size: 7\n", "model.h3.state_size: must be even"),
        ("model:\n  lrpe: some\n", "model.lrpe: 'some' is not one of the allowed values"),
    ],
)
def test_errors_name_file_and_field(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value)
    assert needle in str(e.value), str(e.value)


def test_override_errors_name_the_override():
    with pytest.raises(
        ConfigError, match=r"with --set overrides\): model.pattern: 'LZ' has unknown letter"
    ):
        load_config(REPO / "configs" / "tiny.yaml", ["model.pattern=LZ", "model.num_layers=2"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("training.steps")
    with pytest.raises(ConfigError, match="unknown field 'training.stepz'"):
        load_config(None, ["training.stepz=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))


def test_cli_reports_config_error(tmp_path, capsys):
    from plait.launcher.train import main

    rc = main(["--config", str(_write(tmp_path, "model:\n  pattern: LZ\n"))])
    assert rc == 2
    assert "train: error: " in capsys.readouterr().err


def test_preset_then_fields_beside_it(tmp_path):
    p = _write(tmp_path, "model:\n  hidden_size: 32\n  preset: h3-tiny\n  num_layers: 2\n"
               "  pattern: HA\n")
    cfg = load_config(p)
    assert cfg.model.preset == "h3-tiny" and cfg.model.mlp == "gelu"  # from the preset
    assert cfg.model.pattern == "HA" and cfg.model.num_layers == 2  # given beside it
    assert cfg.model.hidden_size == 32  # order in the file does not matter
    cfg = load_config(None, ["model.preset=transnormer-1b"])
    assert cfg.model.hidden_size == 2048 and cfg.model.lightning_norm == "full"


def test_list_fields():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", ["data.datasets=[runs/a, runs/b]", "data.weights=[3, 1]"]
    )
    assert cfg.data.datasets == ["runs/a", "runs/b"] and cfg.data.weights == [3.0, 1.0]
    with pytest.raises(ConfigError, match=r"data.weights: 1 weights for 2 datasets"):
        load_config(None, ["data.datasets=[a, b]", "data.weights=[1]"])
    with pytest.raises(ConfigError, match=r"data.weights\[1\]: expected a number"):
        load_config(None, ["data.datasets=[a, b]", "data.weights=[1, x]"])
    with pytest.raises(ConfigError, match="data.datasets: expected a list"):
        load_config(None, ["data.datasets=a"])


def test_preparation_options_have_one_owner():
    """The trainer's automatic preparation and ``python -m plait.data.prepare`` read the same
    dataclass, so the same corpus is split the same way by both (same defaults)."""
    import dataclasses

    from plait.data.config import DataConfig, PrepareOptions
    from plait.data.prepare import PrepareConfig, main

    shared = {f.name for f in dataclasses.fields(PrepareOptions)}
    assert shared <= {f.name for f in dataclasses.fields(PrepareConfig)}
    assert DataConfig().prepare == PrepareOptions()
    cli = PrepareConfig(source="s", out="o")
    assert {k: getattr(cli, k) for k in shared} == dataclasses.asdict(PrepareOptions())
    # data.seed (sample order, blend) and data.prepare.seed (the split) are two values
    assert {f.name for f in dataclasses.fields(DataConfig)} & shared == {"seed"}
    # the CLI validates with the same rules: one line, exit 2
    assert main(["--source", "s", "--out", "o", "--val-fraction", "1.5"]) == 2


def _refusal(sets: list[str], world: int = 2) -> str:
    from plait.launcher.layout import check_run

    cfg = load_config(REPO / "configs" / "tiny.yaml", sets)
    try:
        check_run(cfg, world)
    except ConfigError as e:
        return str(e)
    return ""


def test_sequence_lengths_are_checked_at_start_up():
    """With CP=2 and the zigzag layout (4 chunks), seq_len 128 splits but the warmup's first
    length 34 does not: refused before any process group, naming the field."""
    sets = ["model.pattern=AAAA", "parallel.context_parallel=2", "parallel.softmax_sp=ring"]
    assert _refusal(sets) == ""
    warm = sets + ["data.seq_len=136", "data.warmup_seq_len=34", "data.warmup_seq_len_steps=4"]
    err = _refusal(warm)
    assert err.startswith("data.warmup_seq_len: 34 tokens cannot be split evenly"), err
    lala = ["parallel.context_parallel=2", "parallel.softmax_sp=ring", "data.seq_len=136",
            "data.warmup_seq_len=34", "data.warmup_seq_len_steps=4"]
    assert _refusal(lala) == ""  # LASP-2: contiguous chunks, 2 of them
