"""`python -m mdpd_vl.eval`: official file formats in, table + JSON out; bad input is one line
naming the file, exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mdpd_vl.eval.__main__ import main
from mdpd_vl.eval.retrieval import evaluate_itr
from mdpd_vl.eval.video_retrieval import evaluate_vtr


def dump(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_itr_matrix_mapping_and_out(tmp_path, capsys):
    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(4), [6, 5, 5, 5])  # a COCO image with six captions
    sims = rng.standard_normal((4, 21))
    np.save(tmp_path / "sims.npy", sims)
    index = {"format": "mdpd_vl.index", "version": 1, "dataset": "coco", "split": "test",
             "kind": "image_text", "media_root": ".",
             "items": [{"image": f"{i}.jpg", "image_id": i, "captions": ["c"] * int(n)}
                       for i, n in enumerate(np.bincount(owner))]}
    out = tmp_path / "res.json"
    for mapping in (dump(tmp_path / "index.json", index), dump(tmp_path / "map.json", owner.tolist())):
        assert main(["itr", str(tmp_path / "sims.npy"), "--mapping", mapping, "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["task"] == "itr"
        assert res["metrics"] == pytest.approx(evaluate_itr(sims, owner))
    assert "rsum" in capsys.readouterr().out


def test_vtr_text_mapping(tmp_path, capsys):
    rng = np.random.default_rng(1)
    owner = np.array([0, 0, 1, 2, 2, 2])
    sims = rng.standard_normal((6, 3))
    np.save(tmp_path / "sims.npy", sims)
    (tmp_path / "map.txt").write_text("\n".join(map(str, owner)) + "\n")
    out = tmp_path / "res.json"
    assert main(["vtr", str(tmp_path / "sims.npy"), "--mapping", str(tmp_path / "map.txt"),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == pytest.approx(evaluate_vtr(sims, owner))
    assert "v2t" in capsys.readouterr().out


def vqa_files(tmp_path, drop_last=False):
    anns = [{"question_id": q, "image_id": 1, "question_type": "how many", "answer_type": "number",
             "multiple_choice_answer": "2",
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                         for i, a in enumerate(["2"] * 3 + ["3"] * 7)]} for q in (10, 11)]
    results = [{"question_id": 10, "answer": "two"}, {"question_id": 11, "answer": "3"}]
    ann_path = dump(tmp_path / "v2_mscoco_val2014_annotations.json",
                    {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns})
    res_path = dump(tmp_path / "results.json", results[:1] if drop_last else results)
    return res_path, ann_path


def test_vqa_official_files(tmp_path, capsys):
    res_path, ann_path = vqa_files(tmp_path)
    out = tmp_path / "out.json"
    assert main(["vqa", res_path, ann_path, "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["overall"] == 95.0  # "two" -> "2": 3 matches = 0.9; "3": 7 matches = 1.0
    assert metrics["per_answer_type"] == {"number": 95.0}


def test_vqa_missing_question_ids(tmp_path, capsys):
    res_path, ann_path = vqa_files(tmp_path, drop_last=True)
    err = fails(["vqa", res_path, ann_path], capsys)
    assert res_path in err and "no prediction for 1 of 2 questions" in err


def test_gqa_files(tmp_path, capsys):
    questions = {str(i): {"imageId": "n1", "question": "?", "answer": a, "isBalanced": True,
                          "types": {"structural": s, "semantic": "attr", "detailed": "x"}}
                 for i, (a, s) in enumerate([("yes", "verify"), ("red", "query")])}
    q_path = dump(tmp_path / "testdev_balanced_questions.json", questions)
    p_path = dump(tmp_path / "pred.json", [{"questionId": "0", "prediction": "yes"},
                                           {"questionId": "1", "prediction": "Red"}])
    out = tmp_path / "out.json"
    assert main(["gqa", p_path, q_path, "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert (m["accuracy"], m["binary"], m["open"]) == (50.0, 100.0, 0.0)
    dup = dump(tmp_path / "dup.json", [{"questionId": "0", "prediction": "yes"}] * 2)
    assert "appears twice" in fails(["gqa", dup, q_path], capsys)


def test_grounding_mdetr_file_normalised_predictions(tmp_path, capsys):
    images = [{"id": i, "file_name": "COCO_train2014_000000000001.jpg", "height": 100, "width": 200,
               "original_id": 1, "caption": "left dog", "dataset_name": "refcoco",
               "tokens_negative": []} for i in (1, 2)]
    anns = [{"id": 10 + i, "image_id": i, "bbox": [0, 0, 100, 50], "area": 5000, "iscrowd": 0,
             "category_id": 1, "original_id": 5, "tokens_positive": [[0, 4]]} for i in (1, 2)]
    gt = dump(tmp_path / "finetune_refcoco_testA.json",
              {"images": images, "annotations": anns, "categories": []})
    preds = dump(tmp_path / "pred.json", [
        {"image_id": 1, "boxes": [[0.9, 0.9, 0.1, 0.1], [0.25, 0.25, 0.5, 0.5]], "scores": [0.2, 0.8]},
        {"image_id": 2, "boxes": [[0.75, 0.75, 0.5, 0.5]], "scores": [0.9]},
    ])
    out = tmp_path / "out.json"
    assert main(["grounding", preds, gt, "--box-format", "cxcywh_norm", "--out", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    split = m["per_split"]["refcoco/testA"]
    assert split["precision_iou"] == 50.0 and split["count"] == 2
    assert m["mdetr_precision_at_k"]["refcoco/testA"] == {"1": 50.0, "5": 50.0, "10": 50.0}


def test_grounding_canonical_index_and_bad_boxes(tmp_path, capsys):
    index = {"format": "mdpd_vl.index", "version": 1, "dataset": "refcocog", "split": "val",
             "kind": "grounding", "media_root": ".",
             "items": [{"ref_id": 1, "sent_id": 7, "ann_id": 3, "image": "x.jpg", "image_id": 1,
                        "sentence": "a cat", "bbox_xyxy": [0, 0, 10, 10], "width": 20, "height": 20}]}
    gt = dump(tmp_path / "val.index.json", index)
    good = dump(tmp_path / "good.json", [{"sent_id": 7, "bbox": [0, 0, 10, 10]}])
    assert main(["grounding", good, gt]) == 0
    assert "refcocog/val" in capsys.readouterr().out
    neg = dump(tmp_path / "neg.json", [{"sent_id": 7, "bbox": [0, 0, -3, 10]}])
    err = fails(["grounding", neg, gt, "--box-format", "xywh"], capsys)
    assert "neg.json" in err and "negative width" in err
    missing = dump(tmp_path / "missing.json", [{"sent_id": 8, "bbox": [0, 0, 1, 1]}])
    assert "no prediction for 1 of 1" in fails(["grounding", missing, gt], capsys)


def test_bad_files(tmp_path, capsys):
    err = fails(["itr", str(tmp_path / "absent.npy")], capsys)
    assert "absent.npy: no such file" in err
    np.save(tmp_path / "obj.npy", np.array([{"sims": 1}], dtype=object))
    assert "not a plain .npy array" in fails(["itr", str(tmp_path / "obj.npy")], capsys)
    np.save(tmp_path / "bad.npy", np.zeros((2, 9)))
    assert "pass caption_to_image" in fails(["itr", str(tmp_path / "bad.npy")], capsys)
    np.save(tmp_path / "ok.npy", np.zeros((2, 10)))
    (tmp_path / "map.txt").write_text("0\n0\n1\nx\n")
    assert "line 4 is not an integer" in fails(["itr", str(tmp_path / "ok.npy"), "--mapping",
                                                str(tmp_path / "map.txt")], capsys)
    dump(tmp_path / "map.json", [0] * 9 + [5])
    err = fails(["itr", str(tmp_path / "ok.npy"), "--mapping", str(tmp_path / "map.json")], capsys)
    assert "map.json" in err and "outside [0, 2)" in err
    (tmp_path / "broken.json").write_text("{not json")
    assert "not valid JSON" in fails(["gqa", str(tmp_path / "broken.json"),
                                      str(tmp_path / "broken.json")], capsys)
    np.save(tmp_path / "ok.npy", np.eye(3))
    err = fails(["vtr", str(tmp_path / "ok.npy"), "--out", str(tmp_path / "no" / "dir.json")], capsys)
    assert "output folder does not exist" in err


def test_module_entry_point_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mdpd_vl.eval", "vqa", str(tmp_path / "r.json"),
                           str(tmp_path / "a.json")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
