"""data_prep/flickr30k.py and coco.py: Karpathy JSON and the VSE-infinity precomp layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from prep_helpers import garbage, jpeg, load_index, run_script, truncate, write_json, written

from mdpd_vl.data.prep import DATASETS, BadInputError
from mdpd_vl.data.prep.karpathy import prepare_coco, prepare_flickr30k


def sentences(imgid: int, texts: list[str]) -> list[dict]:
    return [{"tokens": t.lower().split(), "raw": t, "imgid": imgid, "sentid": imgid * 10 + k}
            for k, t in enumerate(texts)]


def flickr_raw(root: Path) -> Path:
    """dataset_flickr30k.json with 5 images (train, restval, val, test, test) + flickr30k-images/."""
    images = []
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        name = f"{1000092795 + i}.jpg"
        jpeg(root / "flickr30k-images" / name, color=(40 * i, 10, 10))
        caps = [f"A dog number {i} runs on grass {k} . " for k in range(5)]
        images.append({"sentids": [i * 10 + k for k in range(5)], "imgid": i, "split": split, "filename": name,
                       "sentences": sentences(i, caps)})
    write_json(root / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    return root


def test_flickr30k_index_contents(tmp_path, capsys):
    raw, out = flickr_raw(tmp_path / "raw"), tmp_path / "out"
    assert run_script("flickr30k", ["--raw", str(raw), "--out", str(out)]) == 0
    assert sorted(written(out)) == ["test.index.json", "train.index.json", "val.index.json"]
    train = load_index(out, "train")
    assert {k: train[k] for k in ("format", "version", "dataset", "split", "kind")} == {
        "format": "mdpd_vl.index", "version": 1, "dataset": "flickr30k", "split": "train", "kind": "image_text"}
    assert Path(train["media_root"]) == (raw / "flickr30k-images").resolve()
    # restval is folded into train; captions are the stripped raw sentences
    assert [it["image"] for it in train["items"]] == ["1000092795.jpg", "1000092796.jpg"]
    assert [it["image_id"] for it in train["items"]] == [0, 1]
    assert train["items"][0]["captions"][0] == "A dog number 0 runs on grass 0 ."
    assert len(load_index(out, "test")["items"]) == 2
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "train 2 of 29,000" in warnings[0] and "test 2 of 1,000" in warnings[0]


def test_rerun_is_a_noop_until_force_or_change(tmp_path, capsys):
    raw, out = flickr_raw(tmp_path / "raw"), tmp_path / "out"
    first = prepare_flickr30k(raw, out)
    assert not first.up_to_date
    stamp = (out / "train.index.json").stat().st_mtime_ns
    capsys.readouterr()
    again = prepare_flickr30k(raw, out)
    assert again.up_to_date and "up to date" in capsys.readouterr().out
    assert (out / "train.index.json").stat().st_mtime_ns == stamp
    assert not prepare_flickr30k(raw, out, force=True).up_to_date
    assert (out / "train.index.json").stat().st_mtime_ns != stamp
    # a new image in the media folder or an edited annotation file invalidates the index
    jpeg(raw / "flickr30k-images" / "extra.jpg")
    assert not prepare_flickr30k(raw, out).up_to_date
    assert prepare_flickr30k(raw, out).up_to_date
    data = json.loads((raw / "dataset_flickr30k.json").read_text())
    data["images"][0]["sentences"][0]["raw"] = "A changed caption"
    write_json(raw / "dataset_flickr30k.json", data)
    assert not prepare_flickr30k(raw, out).up_to_date
    assert load_index(out, "train")["items"][0]["captions"][0] == "A changed caption"


def test_out_inside_raw_is_stable(tmp_path):
    raw = flickr_raw(tmp_path / "raw")
    for img in (raw / "flickr30k-images").iterdir():  # images directly in raw, which also holds the output
        img.rename(raw / img.name)
    (raw / "flickr30k-images").rmdir()
    assert not prepare_flickr30k(raw, raw / "index").up_to_date
    assert prepare_flickr30k(raw, raw / "index").up_to_date


def test_coco_karpathy_keeps_extra_captions(tmp_path):
    raw, out = tmp_path / "coco", tmp_path / "out"
    images = []
    for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("test", "val2014")]):
        cocoid = 391895 + i
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        jpeg(raw / folder / name)
        caps = [f"a man rides a moped {k}" for k in range(6 if i == 2 else 5)]
        images.append({"filepath": folder, "filename": name, "imgid": i, "split": split, "cocoid": cocoid,
                       "sentids": [], "sentences": sentences(i, caps)})
    write_json(raw / "dataset_coco.json", {"images": images, "dataset": "coco"})
    report = DATASETS.get("coco")(raw, out)
    assert report.splits == {"train": 2, "test": 1}
    test = load_index(out, "test")
    assert test["items"][0] == {"image": "val2014/COCO_val2014_000000391897.jpg", "image_id": 391897,
                                "captions": [f"a man rides a moped {k}" for k in range(6)]}
    assert Path(test["media_root"]) == raw.resolve()


def test_bad_inputs_one_report_nothing_written(tmp_path, capsys):
    raw, out = flickr_raw(tmp_path / "raw"), tmp_path / "out"
    (raw / "flickr30k-images" / "1000092795.jpg").unlink()  # missing image
    garbage(raw / "flickr30k-images" / "1000092796.jpg")  # does not decode
    data = json.loads((raw / "dataset_flickr30k.json").read_text())
    data["images"][2]["sentences"] = []  # empty caption list
    data["images"][3]["split"] = "tset"  # a split that does not exist
    write_json(raw / "dataset_flickr30k.json", data)
    capsys.readouterr()
    assert run_script("flickr30k", ["--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1000092795.jpg: missing" in err and "1000092796.jpg: does not decode" in err
    assert "empty caption list" in err and "split 'tset' does not exist" in err
    assert "originals are published at" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "4 bad inputs" in err
    assert written(out) == []

    with pytest.raises(BadInputError) as info:
        prepare_flickr30k(raw, out)
    assert len(info.value.report.problems) == 4

    assert run_script("flickr30k", ["--raw", str(raw), "--out", str(out), "--skip-bad"]) == 0
    assert [it["image"] for it in load_index(out, "test")["items"]] == ["1000092799.jpg"]
    assert "train.index.json" not in written(out)  # every train image was bad
    report = json.loads((out / "prep_report.json").read_text())
    assert len(report["skipped"]) == 4 and report["splits"] == {"test": 1}


def test_truncated_json_is_one_line_error(tmp_path, capsys):
    raw, out = flickr_raw(tmp_path / "raw"), tmp_path / "out"
    truncate(raw / "dataset_flickr30k.json")
    assert run_script("flickr30k", ["--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dataset_flickr30k.json" in err[0] and "not valid JSON" in err[0]
    assert written(out) == []


def test_missing_annotations_says_where_to_get_them(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    assert run_script("coco", ["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "dataset_coco.json" in err and "cs.stanford.edu/people/karpathy" in err


def precomp_raw(root: Path, per_caption_ids: bool) -> Path:
    """f30k-style precomp: test split of 3 images, 5 captions each, id_mapping.json + images."""
    (root / "precomp").mkdir(parents=True)
    caps = [f"a caption {i} {k}" for i in range(3) for k in range(5)]
    ids = [i for i in range(3) for _ in range(5)] if per_caption_ids else list(range(3))
    (root / "precomp" / "test_caps.txt").write_text("\n".join(caps) + "\n")
    (root / "precomp" / "test_ids.txt").write_text("\n".join(map(str, ids)) + "\n")
    write_json(root / "id_mapping.json", {str(i): f"{2000 + i}.jpg" for i in range(3)})
    for i in range(3):
        jpeg(root / "flickr30k-images" / f"{2000 + i}.jpg")
    return root


@pytest.mark.parametrize("per_caption_ids", [False, True])
def test_precomp_images_im_div(tmp_path, per_caption_ids):
    raw, out = precomp_raw(tmp_path / "f30k", per_caption_ids), tmp_path / "out"
    report = prepare_flickr30k(raw, out)
    assert report.splits == {"test": 3}
    test = load_index(out, "test")
    assert test["kind"] == "image_text"
    assert test["items"][1] == {"image": "2001.jpg", "image_id": 1, "captions": [f"a caption 1 {k}" for k in range(5)]}


def test_precomp_regions_and_dev_truncation(tmp_path):
    raw, out = tmp_path / "coco", tmp_path / "out"
    pre = raw / "precomp"
    pre.mkdir(parents=True)
    n_dev = 1001  # 5,005 captions: VSE-infinity keeps the first 5,000
    (pre / "dev_caps.txt").write_text("".join(f"cap {i}\n" for i in range(5 * n_dev)))
    (pre / "dev_ids.txt").write_text("".join(f"{500000 + i}\n" for i in range(n_dev)))
    np.save(pre / "dev_ims.npy", np.zeros((n_dev, 2, 4), np.float32))
    (pre / "testall_caps.txt").write_text("".join(f"t {i}\n" for i in range(10)))
    (pre / "testall_ids.txt").write_text("7\n7\n7\n7\n7\n9\n9\n9\n9\n9\n")  # one id per caption
    np.save(pre / "testall_ims.npy", np.zeros((10, 2, 4), np.float32))
    report = prepare_coco(raw, out)
    dev = load_index(out, "dev")
    assert dev["kind"] == "image_region" and len(dev["items"]) == 1000
    assert dev["items"][-1] == {"feature_file": "dev_ims.npy", "row": 999, "image_id": 500999,
                                "captions": [f"cap {i}" for i in range(4995, 5000)]}
    testall = load_index(out, "testall")["items"]
    assert [(it["row"], it["image_id"], len(it["captions"])) for it in testall] == [(0, 7, 5), (5, 9, 5)]
    assert Path(load_index(out, "dev")["media_root"]) == pre.resolve()
    assert report.splits == {"dev": 1000, "testall": 2}

    np.save(pre / "testall_ims.npy", np.zeros((9, 2, 4), np.float32))  # one row short of the ids file
    with pytest.raises(BadInputError) as info:
        prepare_coco(raw, tmp_path / "out2")
    assert "has 9 rows" in info.value.report.problems[0].reason
    assert written(tmp_path / "out2") == []


def test_custom_name_skips_the_official_size_check(tmp_path, capsys):
    raw, out = flickr_raw(tmp_path / "raw"), tmp_path / "out"
    report = prepare_flickr30k(raw, out, name="shapes")
    assert report.dataset == "shapes" and load_index(out, "train")["dataset"] == "shapes"
    assert report.warnings == [] and "warning" not in capsys.readouterr().err
