"""data_prep/refcoco.py: refer's refs(unc).p + instances.json, and MDETR's finetune_*.json."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from prep_helpers import garbage, jpeg, load_index, run_script, truncate, write_json, written

from mdpd_vl.data.prep import BadInputError, prepare
from mdpd_vl.data.prep.refcoco import xywh_to_xyxy

IMAGES = {581857: (640, 427), 580957: (428, 640)}


def coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def refer_raw(root: Path, variant: str = "refcoco", split_by: str = "unc",
              splits: tuple[str, ...] = ("train", "val", "testA", "testB", "train")) -> Path:
    """`<variant>/refs(<split_by>).p` + `instances.json`, images in `images/mscoco/images/train2014/`."""
    images = [{"id": i, "file_name": coco_name(i), "width": w, "height": h} for i, (w, h) in IMAGES.items()]
    anns = [{"id": 100 + k, "image_id": i, "bbox": [10.5 + k, 20.0, 30.0, 40.25], "category_id": 1, "area": 1.0,
             "iscrowd": 0, "segmentation": []} for k, i in enumerate([581857, 580957, 581857, 580957, 580957])]
    refs = []
    for k, (split, ann) in enumerate(zip(splits, anns)):
        sents = [{"sent_id": 10 * k + j, "sent": f"the thing number {k} {j}", "raw": f"The thing {k} {j}",
                  "tokens": []} for j in range(2)]
        refs.append({"ref_id": k, "ann_id": ann["id"], "image_id": ann["image_id"], "category_id": 1,
                     "split": split, "file_name": coco_name(ann["image_id"])[:-4] + f"_{ann['id']}.jpg",
                     "sent_ids": [s["sent_id"] for s in sents], "sentences": sents})
    write_json(root / variant / "instances.json", {"images": images, "annotations": anns, "categories": []})
    with open(root / variant / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    for i, (w, h) in IMAGES.items():
        jpeg(root / "images" / "mscoco" / "images" / "train2014" / coco_name(i), size=(w // 16, h // 16))
    return root


def test_xywh_to_xyxy():
    assert xywh_to_xyxy([468.3, 0.91, 171.7, 116.12]) == pytest.approx([468.3, 0.91, 640.0, 117.03])
    assert xywh_to_xyxy([1, 2, 0, 5]) is None and xywh_to_xyxy([1, 2, 3]) is None
    assert xywh_to_xyxy([1, 2, float("nan"), 4]) is None


def test_refcoco_unc_index(tmp_path, capsys):
    raw, out = refer_raw(tmp_path / "data"), tmp_path / "out"
    assert run_script("refcoco", ["--raw", str(raw), "--out", str(out)]) == 0
    assert written(out) == ["testA.index.json", "testB.index.json", "train.index.json", "val.index.json"]
    train = load_index(out, "train")
    assert train["kind"] == "grounding" and train["dataset"] == "refcoco"
    assert Path(train["media_root"]) == (raw / "images/mscoco/images/train2014").resolve()
    assert train["items"][1] == {
        "ref_id": 0, "sent_id": 1, "ann_id": 100, "image": coco_name(581857), "image_id": 581857,
        "sentence": "the thing number 0 1", "bbox_xyxy": [10.5, 20.0, 40.5, 60.25], "width": 640, "height": 427}
    assert len(train["items"]) == 4 and load_index(out, "testB")["items"][0]["ann_id"] == 103
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "train 4 of 120,624" in warning[0]
    assert prepare("refcoco", raw, out).up_to_date


def test_refcocog_umd(tmp_path):
    raw = refer_raw(tmp_path / "data", "refcocog", "umd", ("train", "val", "test", "val"))
    report = prepare("refcoco", raw, tmp_path / "out", variant="refcocog")
    assert report.dataset == "refcocog" and report.splits == {"train": 2, "val": 4, "test": 2}
    with pytest.raises(Exception, match="split_by"):
        prepare("refcoco", raw, tmp_path / "out2", variant="refcoco+", split_by="umd")


def test_refcoco_bad_inputs(tmp_path, capsys):
    raw, out = refer_raw(tmp_path / "data"), tmp_path / "out"
    with open(raw / "refcoco" / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    refs[1]["split"] = "testC"  # a split that does not exist
    refs[2]["sentences"] = []  # empty caption list
    refs[3]["ann_id"] = 999  # no such annotation
    with open(raw / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    garbage(raw / "images/mscoco/images/train2014" / coco_name(581857))  # does not decode (used by ref 0)
    args = ["--raw", str(raw), "--out", str(out)]
    assert run_script("refcoco", args) == 2
    err = capsys.readouterr().err
    assert "split 'testC' does not exist" in err and "empty caption list" in err
    assert "ann_id 999 is not in instances.json" in err and "does not decode" in err
    assert written(out) == []
    assert run_script("refcoco", [*args, "--skip-bad"]) == 0
    assert json.loads((out / "prep_report.json").read_text())["splits"] == {"train": 2}
    assert [it["ref_id"] for it in load_index(out, "train")["items"]] == [4, 4]
    truncate(raw / "refcoco" / "refs(unc).p")
    assert run_script("refcoco", [*args, "--force"]) == 2
    assert "not a readable pickle" in capsys.readouterr().err


def test_refcoco_all_bad_writes_nothing_even_with_skip_bad(tmp_path):
    raw, out = refer_raw(tmp_path / "data"), tmp_path / "out"
    for path in (raw / "images/mscoco/images/train2014").iterdir():
        path.unlink()
    with pytest.raises(BadInputError):
        prepare("refcoco", raw, out)
    with pytest.raises(Exception, match="no items to write"):
        prepare("refcoco", raw, out, skip_bad=True)
    assert written(out) == []


def test_mdetr_finetune_files(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    # the record quoted in ashkamath/mdetr#89, plus one expression with two boxes (invalid)
    images = [{"file_name": coco_name(580957), "height": 428, "width": 640, "id": 120624, "original_id": 580957,
               "caption": "bowl behind the others can only see part", "dataset_name": "refcoco",
               "tokens_negative": [[0, 4]]},
              {"file_name": coco_name(581857), "height": 427, "width": 640, "id": 120625, "original_id": 581857,
               "caption": "two boxes", "dataset_name": "refcoco", "tokens_negative": []}]
    anns = [{"area": 17770.2, "iscrowd": 0, "image_id": 120624, "category_id": 51, "id": 120624,
             "bbox": [468.3, 0.91, 171.7, 116.12], "original_id": 1537681, "tokens_positive": [[36, 40]]},
            {"image_id": 120625, "id": 1, "bbox": [0, 0, 1, 1]}, {"image_id": 120625, "id": 2, "bbox": [0, 0, 2, 2]}]
    write_json(raw / "mdetr_annotations" / "finetune_refcoco_testA.json",
               {"images": images, "annotations": anns, "categories": []})
    for i in IMAGES:
        jpeg(raw / "train2014" / coco_name(i))
    with pytest.raises(BadInputError, match="1 bad input"):
        prepare("refcoco", raw, out)
    report = prepare("refcoco", raw, out, skip_bad=True)
    assert report.splits == {"testA": 1}
    item = load_index(out, "testA")["items"][0]
    assert item["ref_id"] is None and item["sent_id"] == 120624 and item["ann_id"] == 1537681
    assert item["image_id"] == 580957 and item["bbox_xyxy"] == pytest.approx([468.3, 0.91, 640.0, 117.03])
    assert (item["width"], item["height"]) == (640, 428)
