"""data_prep/vqav2.py and gqa.py: official JSON files, the real answer vocabularies, soft scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prep_helpers import REAL, garbage, jpeg, load_index, run_script, truncate, write_json, written

from mdpd_vl.data.prep import BadInputError, gqa, vqav2
from mdpd_vl.data.prep.vqav2 import soft_score
from mdpd_vl.errors import UserError


def coco(folder: str, image_id: int) -> str:
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


def answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": k + 1} for k, t in enumerate(texts)]


QUESTION_TYPES = (REAL / "vqa_mscoco_question_types.txt").read_text().split("\n")


def vqa_raw(root: Path) -> Path:
    """train2014 (2 questions), val2014 (1) with annotations; test-dev2015 questions only."""
    qa = {
        "train2014": [(458752, 1, "How many dogs are there?", "how many", "number",
                       answers("Two", "2", "two", "2", "3", "three", "2", "2", "two", "2")),
                      (458752, 2, "What color is the bus?", "what color is the", "other",
                       answers("red", "Red", "red.", "maroon", "dark red", "crimson", "pink", "orange", "pink", "blue"))],
        "val2014": [(262148, 3, "Is it raining?", "is it", "yes/no", answers(*["yes"] * 9, "no"))],
    }
    for folder, rows in qa.items():
        qs = [{"image_id": i, "question": q, "question_id": qid} for i, qid, q, *_ in rows]
        anns = [{"question_id": qid, "image_id": i, "question_type": qt, "answer_type": at,
                 "multiple_choice_answer": ans[0]["answer"], "answers": ans} for i, qid, _, qt, at, ans in rows]
        write_json(root / f"v2_OpenEnded_mscoco_{folder}_questions.json",
                   {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": folder,
                    "license": {}, "questions": qs})
        write_json(root / f"v2_mscoco_{folder}_annotations.json",
                   {"info": {}, "license": {}, "data_subtype": folder, "annotations": anns})
        for i, *_ in rows:
            jpeg(root / "images" / coco(folder, i))
    write_json(root / "v2_OpenEnded_mscoco_test-dev2015_questions.json",
               {"info": {}, "questions": [{"image_id": 1, "question": "What is it?", "question_id": 10}]})
    jpeg(root / "images" / coco("test2015", 1))
    return root


def test_soft_score_matches_official_accuracy():
    assert [soft_score(m) for m in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]


def test_vqav2_index_with_real_vocabulary(tmp_path, capsys):
    raw, out = vqa_raw(tmp_path / "vqa"), tmp_path / "out"
    vocab = str(REAL / "vqa_trainval_ans2label.json")
    assert run_script("vqav2", ["--raw", str(raw), "--out", str(out), "--vocab", vocab]) == 0
    assert written(out) == ["ans2label.json", "test-dev.index.json", "train.index.json", "val.index.json"]
    assert json.loads((out / "ans2label.json").read_text()) == json.loads((REAL / "vqa_trainval_ans2label.json").read_text())
    train = load_index(out, "train")
    assert train["kind"] == "vqa" and Path(train["media_root"]) == (raw / "images").resolve()
    first = train["items"][0]
    assert first["image"] == coco("train2014", 458752) and first["question"] == "How many dogs are there?"
    # "Two"/"two" normalise to "2" (7 of 10 -> 1.0); "three" -> "3" (2 of 10 -> 0.6)
    assert first["answers"] == {"2": 1.0, "3": 0.6}
    assert first["question_type"] == "how many" and first["question_type"] in QUESTION_TYPES
    assert len(first["raw_answers"]) == 10 and first["raw_answers"][0] == {
        "answer": "Two", "answer_id": 1, "answer_confidence": "yes"}
    colour = train["items"][1]["answers"]
    # "Red" and "red." count as "red" (3 of 10); answers outside the vocabulary ("crimson") are dropped
    assert colour == {"red": 0.9, "maroon": 0.3, "pink": 0.6, "orange": 0.3, "blue": 0.3}
    assert load_index(out, "val")["items"][0]["answers"] == {"yes": 1.0, "no": 0.3}
    testdev = load_index(out, "test-dev")["items"][0]
    assert testdev["answers"] == {} and testdev["image"] == coco("test2015", 1)
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "train 2 of 443,757" in warning[0]


def test_vqav2_min_count_vocabulary_and_rerun(tmp_path):
    raw, out = vqa_raw(tmp_path / "vqa"), tmp_path / "out"
    report = vqav2.prepare(raw, out, splits="train,val", min_count=1)
    assert report.splits == {"train": 2, "val": 1}
    vocab = json.loads((out / "ans2label.json").read_text())
    assert sorted(vocab) == ["2", "red", "yes"]  # normalised multiple_choice_answer
    assert load_index(out, "train")["items"][0]["answers"] == {"2": 1.0}  # "3" is outside the vocabulary
    assert vqav2.prepare(raw, out, splits="train,val", min_count=1).up_to_date
    before = (out / "train.index.json").read_bytes()
    with pytest.raises(UserError, match="no answer occurs 2 times"):  # each answer is one question's
        vqav2.prepare(raw, out, splits="train,val", min_count=2)
    assert (out / "train.index.json").read_bytes() == before  # a failed run leaves the old index intact
    assert not vqav2.prepare(raw, out, splits="train,val", min_count=1, force=True).up_to_date
    assert "test-dev.index.json" not in written(out)
    # adding the test split later leaves the train/val indexes and their vocabulary alone
    vocab_bytes = (out / "ans2label.json").read_bytes()
    assert vqav2.prepare(raw, out, splits=["test-dev"]).splits == {"test-dev": 1}
    assert (out / "ans2label.json").read_bytes() == vocab_bytes
    assert written(out) == ["ans2label.json", "test-dev.index.json", "train.index.json", "val.index.json"]
    assert vqav2.prepare(raw, out, splits="train,val", min_count=1).up_to_date


def test_vqav2_bad_inputs(tmp_path, capsys):
    raw, out = vqa_raw(tmp_path / "vqa"), tmp_path / "out"
    args = ["--raw", str(raw), "--out", str(out), "--min-count", "1"]
    assert run_script("vqav2", [*args, "--splits", "train,minival"]) == 2
    assert "split 'minival' does not exist; valid: train, val, test-dev, test" in capsys.readouterr().err
    (raw / "images" / coco("val2014", 262148)).unlink()
    garbage(raw / "images" / coco("test2015", 1))
    ann_file = raw / "v2_mscoco_train2014_annotations.json"
    data = json.loads(ann_file.read_text())
    data["annotations"][1]["answers"] = []
    write_json(ann_file, data)
    assert run_script("vqav2", args) == 2
    err = capsys.readouterr().err
    assert "question 2: empty answer list" in err and "262148.jpg: missing" in err and "does not decode" in err
    assert written(out) == []
    assert run_script("vqav2", [*args, "--skip-bad"]) == 0
    assert written(out) == ["ans2label.json", "prep_report.json", "train.index.json"]
    truncate(ann_file)
    assert run_script("vqav2", [*args, "--force"]) == 2
    assert "v2_mscoco_train2014_annotations.json: not valid JSON" in capsys.readouterr().err


def gqa_raw(root: Path) -> Path:
    def record(image: str, question: str, answer: str | None, structural: str, balanced: bool = True) -> dict:
        rec = {"imageId": image, "question": question, "fullAnswer": "", "isBalanced": balanced,
               "groups": {"global": None, "local": "x"}, "entailed": [], "equivalent": [],
               "types": {"structural": structural, "semantic": "attr", "detailed": "d"},
               "annotations": {"question": {}, "answer": {}, "fullAnswer": {}}, "semantic": [], "semanticStr": ""}
        if answer is not None:
            rec["answer"] = answer
        return rec

    write_json(root / "train_balanced_questions.json",
               {"02930152": record("2354786", "Is the sky dark?", "yes", "verify"),
                "07333408": record("2375429", "What is the cat eating?", "cat food", "query", False)})
    write_json(root / "testdev_balanced_questions.json", {"20968379": record("n288870", "Who is it?", "man", "query")})
    write_json(root / "test_balanced_questions.json", {"t1": record("n161313", "What is it?", None, "query")})
    for image in ("2354786", "2375429", "n288870", "n161313"):
        jpeg(root / "images" / f"{image}.jpg")
    return root


def test_gqa_index(tmp_path):
    raw, out = gqa_raw(tmp_path / "gqa"), tmp_path / "out"
    vocab = str(REAL / "gqa_trainval_ans2label.json")
    assert run_script("gqa", ["--raw", str(raw), "--out", str(out), "--vocab", vocab]) == 0
    train = load_index(out, "train")
    assert train["kind"] == "gqa"
    assert train["items"][1] == {"question_id": "07333408", "image": "2375429.jpg", "image_id": "2375429",
                                 "question": "What is the cat eating?", "answer": "cat food",
                                 "structural": "query", "semantic": "attr", "is_balanced": False}
    assert load_index(out, "test")["items"][0]["answer"] is None
    assert json.loads((out / "ans2label.json").read_text())["cat food"] == 0
    assert gqa.prepare(raw, out, vocab=vocab).up_to_date


def test_gqa_bad_inputs(tmp_path):
    raw, out = gqa_raw(tmp_path / "gqa"), tmp_path / "out"
    data = json.loads((raw / "testdev_balanced_questions.json").read_text())
    del data["20968379"]["answer"]  # testdev questions all have answers
    write_json(raw / "testdev_balanced_questions.json", data)
    (raw / "images" / "2354786.jpg").unlink()
    with pytest.raises(BadInputError) as info:
        gqa.prepare(raw, out)
    assert [p.split for p in info.value.report.problems] == ["testdev", "train"]
    assert written(out) == []
    with pytest.raises(Exception, match="split 'testdev_all' does not exist"):
        gqa.prepare(raw, out, splits=["testdev_all"])
    report = gqa.prepare(raw, out, skip_bad=True)
    assert report.splits == {"train": 1, "test": 1}
    # the vocabulary follows the annotations, whichever images are present
    assert json.loads((out / "ans2label.json").read_text()) == {"cat food": 0, "yes": 1}
