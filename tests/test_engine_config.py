"""Config dataclasses: YAML + --set overrides, type checks, every bad input as one UserError line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from mdpd_vl.engine.config import (
    TrainConfig,
    config_to_yaml,
    dump_config,
    load_config,
    parse_overrides,
    save_config,
)
from mdpd_vl.errors import UserError


@dataclass
class ModelCfg:
    name: str = "tiny"
    widths: list[int] = field(default_factory=lambda: [8, 16])
    grid: tuple[int, int] | None = None


@dataclass
class RunCfg:
    out: Path = Path("runs/x")
    tag: str | None = None
    mode: Literal["joint", "alternate"] = "joint"
    model: ModelCfg = field(default_factory=ModelCfg, metadata={"help": "the network"})
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class NeedsName:
    name: str
    size: int = 1


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_without_file():
    cfg = load_config(RunCfg)
    assert cfg == RunCfg()


def test_yaml_nested_and_coercions(tmp_path):
    path = write(
        tmp_path,
        "mode: alternate\nmodel:\n  name: mlp\n  grid: [7, 7]\ntrain:\n  lr: 1e-4\n  epochs: 3\n"
        "  betas: [0.9, 0.95]\n  max_grad_norm: 2\n  max_steps: null\n",
    )
    cfg = load_config(RunCfg, path)
    assert cfg.mode == "alternate" and cfg.model.name == "mlp"
    assert cfg.model.grid == (7, 7) and cfg.model.widths == [8, 16]  # untouched keys keep defaults
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)  # `1e-4` is a float, not a string
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.epochs == 3
    assert cfg.train.max_grad_norm == 2.0 and isinstance(cfg.train.max_grad_norm, float)  # int -> float
    assert cfg.out == Path("runs/x")


def test_overrides_parse_yaml_scalars(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.1\n")
    sets = ["train.lr=3e-5", "train.mixed_precision=no", "model.widths=[1, 2, 3]", "tag=null", "out=/tmp/r"]
    cfg = load_config(RunCfg, path, sets)
    assert cfg.train.lr == 3e-5 and cfg.train.mixed_precision == "no"
    assert cfg.model.widths == [1, 2, 3] and cfg.tag is None and cfg.out == Path("/tmp/r")
    assert parse_overrides(["a.b=true", "c=x=y"]) == [("a.b", True), ("c", "x=y")]


def test_required_key_from_override(tmp_path):
    assert load_config(NeedsName, None, ["name=abc"]).name == "abc"
    with pytest.raises(UserError, match=r"^<defaults>: name: required key is missing$"):
        load_config(NeedsName)


@pytest.mark.parametrize(
    ("text", "sets", "pattern"),
    [
        (
            "model:\n  nmae: x\n",
            [],
            r"cfg\.yaml: model\.nmae: unknown key in 'model'; valid keys: name, widths, grid$",
        ),
        ("bogus: 1\n", [], r"cfg\.yaml: bogus: unknown key; valid keys: out, tag, mode, model, train$"),
        ("train:\n  lr: fast\n", [], r"cfg\.yaml: train\.lr: expected float, got str 'fast'$"),
        ("train:\n  epochs: 1.5\n", [], r"cfg\.yaml: train\.epochs: expected int, got float 1\.5$"),
        ("train:\n  epochs: true\n", [], r"cfg\.yaml: train\.epochs: expected int, got bool True$"),
        ("mode: both\n", [], r"cfg\.yaml: mode: expected one of 'joint', 'alternate', got str 'both'$"),
        ("model:\n  widths: [1, x]\n", [], r"cfg\.yaml: model\.widths\[1\]: expected int, got str 'x'$"),
        ("model:\n  grid: [1, 2, 3]\n", [], r"cfg\.yaml: model\.grid: expected tuple\[int, int\] \| null"),
        ("model: 5\n", [], r"cfg\.yaml: model: expected a mapping \(ModelCfg\), got int 5$"),
        ("train:\n  lr: -1\n", [], r"cfg\.yaml: train\.lr: must be > 0, got -1\.0$"),  # __post_init__
        ("- 1\n- 2\n", [], r"cfg\.yaml: the top level must be a mapping of keys, got list$"),
        ("a: 1\na: 2\n", [], r"cfg\.yaml: invalid YAML: duplicate key 'a' \(line 2, column 1\)$"),
        ("a: [1\n", [], r"cfg\.yaml: invalid YAML: .*\(line \d+, column \d+\)$"),
        (
            "",
            ["train.lrr=1"],
            r"^--set train\.lrr=1: train\.lrr: unknown key in 'train'; valid keys: epochs,",
        ),
        ("", ["train.lr=abc"], r"^--set train\.lr=abc: train\.lr: expected float, got str 'abc'$"),
        ("", ["train.batch_size=0"], r"^--set train\.batch_size=0: train\.batch_size: must be >= 1, got 0$"),
        ("", ["mode.x=1"], r"^--set mode\.x=1: mode: one of 'joint', 'alternate' has no sub-keys$"),
        ("", ["lr"], r"^--set lr: expected KEY=VALUE"),
        ("", ["a..b=1"], r"^--set a\.\.b=1: expected KEY=VALUE"),
    ],
)
def test_bad_input_is_one_user_error_line(tmp_path, text, sets, pattern):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(RunCfg, path, sets)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path) if not sets else "--set"), message
    assert __import__("re").search(pattern, message), message


def test_override_fixes_file_value(tmp_path):
    """A later --set replaces a bad file value; errors point at the source that set the value."""
    path = write(tmp_path, "train:\n  lr: fast\n")
    assert load_config(RunCfg, path, ["train.lr=0.5"]).train.lr == 0.5


def test_missing_and_directory_config(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: config file not found$"):
        load_config(RunCfg, tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=r": not a file$"):
        load_config(RunCfg, tmp_path)


def test_dump_save_round_trip(tmp_path):
    cfg = load_config(RunCfg, None, ["model.grid=[2, 3]", "train.lr=2e-4", "tag=t"])
    data = dump_config(cfg)
    assert data["model"]["grid"] == [2, 3] and data["out"] == "runs/x"
    json.dumps(data)  # plain data only
    for name in ("saved.yaml", "saved.json"):
        save_config(cfg, tmp_path / name)
        assert load_config(RunCfg, tmp_path / name) == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.json", "saved.yaml"]  # no temp files left
    text = config_to_yaml(cfg, header="python -m x --config c.yaml")
    assert text.startswith("# python -m x --config c.yaml\n")
    assert "model:  # the network" in text and "lr: 0.0002  # peak learning rate" in text
    assert yaml.safe_load(text)["train"]["lr"] == 2e-4


def test_save_config_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cfg\.yaml: cannot write \(Not a directory\)$"):
        save_config(RunCfg(), blocker / "cfg.yaml")


def test_train_config_defaults_are_valid_and_documented():
    cfg = TrainConfig()
    assert cfg.schedule in ("cosine", "linear", "constant") and cfg.mixed_precision == "auto"
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(TrainConfig))


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mdpd_vl.engine.config", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_exit_codes(tmp_path):
    good = write(tmp_path, "lr: 1e-4\nschedule: linear\n", "good.yaml")
    ok = run_cli("--check", str(good))
    assert ok.returncode == 0 and ok.stdout.strip() == f"ok: {good}"
    printed = run_cli("--check", str(good), "--set", "epochs=4", "--print")
    assert yaml.safe_load(printed.stdout)["epochs"] == 4

    bad = write(tmp_path, "lr: 1e-4\nwarmup: 10\n", "bad.yaml")
    for args, needle in [
        (("--check", str(bad)), f"error: {bad}: warmup: unknown key; valid keys: epochs, max_steps"),
        (("--check", str(tmp_path / "missing.yaml")), "missing.yaml: config file not found"),
        (("--check", str(good), "--set", "lr=x"), "error: --set lr=x: lr: expected float, got str 'x'"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr
