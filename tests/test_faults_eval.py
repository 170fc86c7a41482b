"""Faults of the evaluation CLI (`python -m mdpd_vl.eval`): every input file of every task truncated,
empty, mis-encoded, of the wrong type or shape, non-finite; --out under a regular file (refused before
any scoring), a full disk or a kill while the metrics are written. Exit status 2, one line naming the
file, no traceback, nothing half-written; a later good run is unaffected."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from faults_helpers import error_line, killed, no_space, run_faulty, temp_files

from mdpd_vl.eval.__main__ import main


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


def itr(d: Path) -> tuple[list[str], dict[str, Path]]:
    sims = d / "sims.npy"
    np.save(sims, np.random.default_rng(0).standard_normal((3, 15)))
    mapping = _dump(d / "map.json", [i // 5 for i in range(15)])
    return ["itr", str(sims), "--mapping", str(mapping)], {"npy": sims, "mapping": mapping}


def vtr(d: Path) -> tuple[list[str], dict[str, Path]]:
    sims = d / "sims.npy"
    np.save(sims, np.random.default_rng(1).standard_normal((4, 4)))
    mapping = d / "map.txt"
    mapping.write_text("0\n1\n2\n3\n")
    return ["vtr", str(sims), "--mapping", str(mapping)], {"npy": sims, "txt": mapping}


def vqa(d: Path) -> tuple[list[str], dict[str, Path]]:
    anns = [{"question_id": q, "image_id": 1, "question_type": "what", "answer_type": "other",
             "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": i} for i in range(10)]}
            for q in (1, 2)]
    a = _dump(d / "annotations.json", {"annotations": anns})
    r = _dump(d / "results.json", [{"question_id": 1, "answer": "red"}, {"question_id": 2, "answer": "blue"}])
    return ["vqa", str(r), str(a)], {"json": r, "json2": a}


def gqa(d: Path) -> tuple[list[str], dict[str, Path]]:
    q = _dump(d / "questions.json", {str(i): {"imageId": "n1", "question": "?", "answer": a, "isBalanced": True,
                                              "types": {"structural": "query", "semantic": "attr"}}
                                     for i, a in enumerate(["red", "yes"])})
    p = _dump(d / "predictions.json", [{"questionId": "0", "prediction": "red"},
                                       {"questionId": "1", "prediction": "no"}])
    return ["gqa", str(p), str(q)], {"json": p, "json2": q}


def grounding(d: Path) -> tuple[list[str], dict[str, Path]]:
    index = {"format": "mdpd_vl.index", "version": 1, "dataset": "refcoco", "split": "val", "kind": "grounding",
             "media_root": ".", "items": [{"sent_id": k, "image": "x.jpg", "sentence": "s",
                                           "bbox_xyxy": [0, 0, 10, 10], "width": 20, "height": 20} for k in (1, 2)]}
    gt = _dump(d / "val.index.json", index)
    p = _dump(d / "pred.json", [{"sent_id": 1, "bbox": [0, 0, 10, 10]}, {"sent_id": 2, "bbox": [5, 5, 9, 9]}])
    return ["grounding", str(p), str(gt)], {"json": p, "json2": gt, "boxes": p}


TASKS: dict[str, Callable[[Path], tuple[list[str], dict[str, Path]]]] = {
    "itr": itr, "vtr": vtr, "vqa": vqa, "gqa": gqa, "grounding": grounding}


def _cut(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _npy(values) -> Callable[[Path], None]:
    return lambda p: np.save(p, values)


FAULTS: dict[str, list[tuple[str, Callable[[Path], None], str]]] = {
    # file role -> (fault, mutate, text the error line must hold)
    "npy": [("truncated", _cut, "not a plain .npy array"), ("empty", lambda p: p.write_bytes(b""), "not a plain"),
            ("text, not npy", lambda p: p.write_text("1 2 3\n"), "not a plain .npy array"),
            ("pickled objects", _npy(np.array([{"a": 1}], dtype=object)), "not a plain .npy array"),
            ("wrong shape", _npy(np.zeros((2, 3, 4))), "2-D"),
            ("wrong type", _npy(np.array([["a", "b"], ["c", "d"]])), "expected numbers"),
            ("nan", lambda p: np.save(p, np.where(np.eye(*np.load(p).shape) > 0, np.nan, np.load(p))), "non-finite"),
            ("inf", lambda p: np.save(p, np.where(np.eye(*np.load(p).shape) > 0, np.inf, np.load(p))), "non-finite")],
    "mapping": [("truncated", _cut, "not valid JSON"), ("empty", lambda p: p.write_bytes(b""), "not valid JSON"),
                ("mis-encoded", lambda p: p.write_bytes(b"[0, 0, \xe9]"), "not valid JSON"),
                ("wrong type", lambda p: p.write_text('["a", "b"]'), "expected a list of integers"),
                ("wrong shape", lambda p: p.write_text("[0, 1]"), "expected 15 entries")],
    "txt": [("mis-encoded", lambda p: p.write_bytes(b"0\n1\n\xff\n3\n"), "cannot read as UTF-8 text"),
            ("wrong type", lambda p: p.write_text("0\n1\ntwo\n3\n"), "line 3 is not an integer"),
            ("truncated", lambda p: p.write_text("0\n1\n"), "expected 4 entries")],
    "json": [("truncated", _cut, "not valid JSON"), ("empty", lambda p: p.write_bytes(b""), "not valid JSON"),
             ("mis-encoded", lambda p: p.write_bytes(p.read_bytes().replace(b'"', b'"\xe9', 1)), "not valid JSON"),
             ("wrong type", lambda p: p.write_text('{"a": 1}'), ""),
             ("a folder", lambda p: (p.unlink(), p.mkdir()), "not a file")],
    "json2": [("truncated", _cut, "not valid JSON"), ("empty", lambda p: p.write_bytes(b""), "not valid JSON"),
              ("wrong type", lambda p: p.write_text("[1, 2]"), "")],
    "boxes": [("non-finite box", lambda p: p.write_text(json.dumps([{"sent_id": 1, "bbox": [0, 0, 1e999, 1]},
                                                                    {"sent_id": 2, "bbox": [0, 0, 1, 1]}])),
               "non-finite"),
              ("wrong shape box", lambda p: p.write_text(json.dumps([{"sent_id": 1, "bbox": [0, 0, 1]},
                                                                     {"sent_id": 2, "bbox": [0, 0, 1, 1]}])),
               "shape")],
}
def _roles(task: str) -> list[str]:
    return {"itr": ["npy", "mapping"], "vtr": ["npy", "txt"], "vqa": ["json", "json2"], "gqa": ["json", "json2"],
            "grounding": ["json", "json2", "boxes"]}[task]


CASES = [(task, role, name) for task in TASKS for role in _roles(task) for name, _, _ in FAULTS[role]]


def _fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return error_line(capsys.readouterr().err)


@pytest.mark.parametrize(("task", "role", "fault"), CASES)
def test_bad_input_file_is_one_line_and_writes_nothing(tmp_path: Path, capsys, task: str, role: str,
                                                       fault: str) -> None:
    argv, files = TASKS[task](tmp_path)
    out = tmp_path / "metrics.json"
    _, mutate, expected = next(f for f in FAULTS[role] if f[0] == fault)
    mutate(files[role])
    line = _fails([*argv, "--out", str(out)], capsys)
    assert str(files[role]) in line and expected in line, line
    assert not out.exists() and temp_files(tmp_path) == []
    (tmp_path / "good").mkdir()
    good, _ = TASKS[task](tmp_path / "good")
    assert main([*good, "--out", str(out)]) == 0 and json.loads(out.read_text())["task"] == task


@pytest.mark.parametrize("where", ["under a file", "a folder", "in a missing folder"])
@pytest.mark.parametrize("task", TASKS)
def test_bad_out_is_refused_before_any_input_is_read(tmp_path: Path, capsys, task: str, where: str) -> None:
    argv, files = TASKS[task](tmp_path)
    for p in files.values():  # every input gone: only the --out check can speak first
        p.unlink(missing_ok=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = {"under a file": blocker / "m.json", "a folder": tmp_path, "in a missing folder": tmp_path / "no" / "m.json"}
    line = _fails([*argv, "--out", str(out[where])], capsys)
    assert "--out" in line and "no such file" not in line


@pytest.mark.parametrize("task", TASKS)
def test_full_disk_on_out_is_one_line_and_keeps_the_old_metrics(tmp_path: Path, capsys, monkeypatch,
                                                                task: str) -> None:
    argv, _ = TASKS[task](tmp_path)
    out = tmp_path / "metrics.json"
    assert main([*argv, "--out", str(out)]) == 0
    before = out.read_bytes()
    no_space(monkeypatch, "metrics.json", after=5)
    line = _fails([*argv, "--out", str(out)], capsys)
    assert line.startswith(f"error: {out}: cannot write (No space left on device); it needs")
    assert out.read_bytes() == before and temp_files(tmp_path) == []


@pytest.mark.parametrize("task", ["itr", "vqa", "grounding"])
def test_kill_while_writing_out_then_a_good_run(tmp_path: Path, task: str) -> None:
    argv, _ = TASKS[task](tmp_path)
    out = tmp_path / "metrics.json"
    done = run_faulty(["--module", "mdpd_vl.eval"], [*argv, "--out", str(out)],
                      kill_fsync=f"{tmp_path}/.metrics.json.*.tmp", timeout=120)
    assert killed(done) and not out.exists() and len(temp_files(tmp_path)) == 1
    again = run_faulty(["--module", "mdpd_vl.eval"], [*argv, "--out", str(out)], timeout=120)
    assert again.returncode == 0 and json.loads(out.read_text())["task"] == task
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1.5", "x"])
def test_non_finite_or_out_of_range_threshold_is_refused(tmp_path: Path, capsys, value: str) -> None:
    argv, _ = grounding(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--threshold", value])
    assert exc.value.code == 2 and "--threshold" in capsys.readouterr().err
