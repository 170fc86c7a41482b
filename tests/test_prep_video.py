"""data_prep/msrvtt.py and msvd.py on the real CSVs and split lists, with tiny PyAV-written videos."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from prep_helpers import (
    REAL,
    garbage,
    load_index,
    real_head,
    real_tail,
    run_script,
    truncate,
    video,
    write_json,
    written,
)

from mdpd_vl.data.prep import BadInputError, msrvtt, msvd
from mdpd_vl.data.prep.common import read_csv, read_lines
from mdpd_vl.data.prep.media import check_video


def test_real_files_parse_whole():
    assert len(read_csv(REAL / "MSRVTT_train.9k.csv", ["video_id"])) == 9000
    assert len(read_csv(REAL / "MSRVTT_train.7k.csv", ["video_id"])) == 7010
    test = read_csv(REAL / "MSRVTT_JSFUSION_test.csv", ["video_id", "sentence"])
    assert len(test) == 1000 and test[0]["sentence"] == "a person is connecting something to system"
    # train and val lists lack a final newline; every id is still read, the last one whole
    for split, n in [("train", 1200), ("val", 100), ("test", 670)]:
        ids = read_lines(REAL / f"msvd_{split}_list.txt")
        assert len(ids) == n and ids[-1] == (REAL / f"msvd_{split}_list.txt").read_text().split()[-1]


def msrvtt_raw(root: Path) -> tuple[list[str], list[str]]:
    """The first 4 real train ids (9k CSV) and 3 real test rows, MSRVTT_data.json, tiny videos."""
    train = real_head("MSRVTT_train.9k.csv", root / "msrvtt_data" / "MSRVTT_train.9k.csv", 5)[1:]
    test_rows = real_head("MSRVTT_JSFUSION_test.csv", root / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv", 4)[1:]
    test = [row.split(",")[2] for row in test_rows]
    sentences = [{"sen_id": len(train) * k + i, "video_id": v, "caption": f"caption {k} of {v}"}
                 for k in range(3) for i, v in enumerate(train + test)]
    videos = [{"id": i, "video_id": v, "category": 0, "url": "", "start time": 0, "end time": 1, "split": "train"}
              for i, v in enumerate(train + test)]
    write_json(root / "msrvtt_data" / "MSRVTT_data.json", {"info": {}, "videos": videos, "sentences": sentences})
    for v in train[:-1] + test:
        video(root / "videos" / "all" / f"{v}.mp4")
    video(root / "videos" / "all" / f"{train[-1]}.webm")  # CLIP4Clip's fallback extension
    return train, test


def test_msrvtt_index(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    train, test = msrvtt_raw(raw)
    assert run_script("msrvtt", ["--raw", str(raw), "--out", str(out)]) == 0
    tr, te = load_index(out, "train"), load_index(out, "test")
    assert tr["kind"] == te["kind"] == "video_text"
    assert Path(tr["media_root"]) == (raw / "videos" / "all").resolve()
    assert [it["video_id"] for it in tr["items"]] == train
    assert tr["items"][0] == {"video": f"{train[0]}.mp4", "video_id": train[0],
                              "captions": [f"caption {k} of {train[0]}" for k in range(3)]}
    assert tr["items"][-1]["video"] == f"{train[-1]}.webm"
    assert te["items"][0] == {"video": "video9770.mp4", "video_id": "video9770",
                              "captions": ["a person is connecting something to system"]}
    assert [it["video_id"] for it in te["items"]] == test
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warning) == 1 and "train 4 of 9,000" in warning[0] and "test 3 of 1,000" in warning[0]

    report = msrvtt.prepare(raw, out, expand_sentences=True)
    assert not report.up_to_date  # a different option is a different index
    items = load_index(out, "train")["items"]
    assert len(items) == 12 and all(len(it["captions"]) == 1 for it in items)
    assert msrvtt.prepare(raw, out, expand_sentences=True).up_to_date


def test_msrvtt_bad_inputs(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    train, test = msrvtt_raw(raw)
    (raw / "videos" / "all" / f"{train[0]}.mp4").unlink()  # missing video
    garbage(raw / "videos" / "all" / f"{train[1]}.mp4")  # does not decode
    video(raw / "videos" / "all" / f"{test[0]}.mp4", frames=2)  # shorter than --min-frames 3
    data = json.loads((raw / "msrvtt_data" / "MSRVTT_data.json").read_text())
    data["sentences"] = [s for s in data["sentences"] if s["video_id"] != train[2]]  # empty caption list
    write_json(raw / "msrvtt_data" / "MSRVTT_data.json", data)
    args = ["--raw", str(raw), "--out", str(out), "--min-frames", "3"]
    assert run_script("msrvtt", args) == 2
    err = capsys.readouterr().err
    assert f"{train[0]}.mp4: missing" in err and f"{train[1]}.mp4: does not decode" in err
    assert "fewer than min_frames=3" in err and f"{train[2]}: empty caption list" in err
    assert "4 bad inputs" in err and written(out) == []
    assert run_script("msrvtt", [*args, "--skip-bad"]) == 0
    assert [it["video_id"] for it in load_index(out, "train")["items"]] == [train[3]]
    assert [it["video_id"] for it in load_index(out, "test")["items"]] == test[1:]
    assert len(json.loads((out / "prep_report.json").read_text())["skipped"]) == 4


def test_msrvtt_truncated_json(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    msrvtt_raw(raw)
    truncate(raw / "msrvtt_data" / "MSRVTT_data.json", 0.6)
    assert run_script("msrvtt", ["--raw", str(raw), "--out", str(out)]) == 2
    assert "MSRVTT_data.json: not valid JSON" in capsys.readouterr().err
    assert written(out) == []


def msvd_raw(root: Path) -> dict[str, list[str]]:
    """Real ids (train/val tails without a final newline, test head), a raw-captions.pkl with a
    varying number of captions per video, and .avi videos found by walking nested folders."""
    ids = {"train": real_tail("msvd_train_list.txt", root / "train_list.txt", 2),
           "val": real_tail("msvd_val_list.txt", root / "val_list.txt", 1),
           "test": real_head("msvd_test_list.txt", root / "test_list.txt", 2)}
    assert not (root / "train_list.txt").read_bytes().endswith(b"\n")
    every = [v for vs in ids.values() for v in vs]
    captions = {v: [["a", "man", "is", "cooking", str(k)] for k in range(1 + 2 * i)] for i, v in enumerate(every)}
    with open(root / "raw-captions.pkl", "wb") as f:
        pickle.dump(captions, f, protocol=2)
    for i, v in enumerate(every):
        video(root / "YouTubeClips" / ("part2" if i % 2 else "") / f"{v}.avi", fmt="avi")
    return ids


def test_msvd_index(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    ids = msvd_raw(raw)
    assert run_script("msvd", ["--raw", str(raw), "--out", str(out)]) == 0
    train = load_index(out, "train")
    assert [it["video_id"] for it in train["items"]] == ids["train"]
    assert train["items"][1] == {"video": f"part2/{ids['train'][1]}.avi", "video_id": ids["train"][1],
                                 "captions": [f"a man is cooking {k}" for k in range(3)]}
    assert [len(it["captions"]) for it in load_index(out, "test")["items"]] == [7, 9]
    assert msvd.prepare(raw, out).up_to_date


def test_msvd_bad_inputs(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    ids = msvd_raw(raw)
    msvd.prepare(raw, out)
    (raw / "YouTubeClips" / f"{ids['train'][0]}.avi").unlink()  # missing
    garbage(raw / "YouTubeClips" / f"{ids['val'][0]}.avi")  # does not decode
    with open(raw / "raw-captions.pkl", "rb") as f:
        captions = pickle.load(f)
    captions[ids["test"][0]] = []  # empty caption list
    with open(raw / "raw-captions.pkl", "wb") as f:
        pickle.dump(captions, f)
    with pytest.raises(BadInputError) as info:
        msvd.prepare(raw, out)
    reasons = sorted(p.reason.split(" (")[0] for p in info.value.report.problems)
    assert reasons == ["does not decode", f"{ids['test'][0]}: empty caption list", "missing"]
    assert written(out) == ["test.index.json", "train.index.json", "val.index.json"]  # the earlier, good run
    assert len(load_index(out, "train")["items"]) == 2
    report = msvd.prepare(raw, out, skip_bad=True)
    assert report.splits == {"train": 1, "test": 1}  # val lost its only video: its old index goes too
    assert written(out) == ["prep_report.json", "test.index.json", "train.index.json"]
    truncate(raw / "raw-captions.pkl")
    assert run_script("msvd", ["--raw", str(raw), "--out", str(out), "--force"]) == 2
    assert "raw-captions.pkl: not a readable pickle" in capsys.readouterr().err


def test_check_video(tmp_path):
    good = video(tmp_path / "a.mp4", frames=3)
    assert check_video(good) is None and check_video(good, min_frames=3) is None
    assert "fewer than min_frames=4" in check_video(good, min_frames=4)
    assert check_video(tmp_path / "nope.mp4") == "missing"
    assert check_video(garbage(tmp_path / "bad.mp4")).startswith("does not decode")
    truncate(good, 0.3)
    assert check_video(good) is not None
