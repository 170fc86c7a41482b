"""The synthetic shapes world end to end at tiny scale: original formats, indexes via the real
readers, determinism, caption ambiguity, re-run no-op, and the caption claims themselves."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mdpd_vl.data import shapes_world as W
from mdpd_vl.data.datasets import load_index
from mdpd_vl.data.shapes_scenes import Background, Scene, Thing, perturb, sample_scene
from mdpd_vl.data.shapes_text import (
    SIZE_WORDS,
    ambiguous_share,
    claim_matches,
    image_captions,
    video_captions,
    video_claim_matches,
)
from mdpd_vl.errors import UserError

REAL = Path(__file__).resolve().parent / "fixtures" / "real"
CLI = Path(__file__).resolve().parents[1] / "data_prep" / "shapes.py"
KINDS = {"itr": "image_text", "msrvtt": "video_text", "msvd": "video_text", "vqa": "vqa", "gqa": "gqa",
         "refcoco": "grounding"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, W.ShapesReport]:
    root = tmp_path_factory.mktemp("shapes")
    return root, W.build_shapes(root, "tiny", seed=0, progress=False)


def _digest(folder: Path, pattern: str) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern))}


def test_karpathy_json_and_images(world):
    root, report = world
    data = json.loads((root / "raw/itr/dataset_shapes.json").read_text())
    assert set(data) == {"images", "dataset"}
    splits = [im["split"] for im in data["images"]]
    assert [splits.count(s) for s in ("train", "val", "test")] == list(W.SCALES["tiny"].itr)
    for im in data["images"]:
        assert {"filepath", "filename", "imgid", "split", "sentences", "sentids"} <= set(im)
        assert len(im["sentences"]) == 5 and im["sentids"] == [s["sentid"] for s in im["sentences"]]
        assert all(s["imgid"] == im["imgid"] and s["tokens"] and s["raw"] for s in im["sentences"])
        assert (root / "raw/itr" / im["filepath"] / im["filename"]).stat().st_size > 500


def test_video_formats(world):
    import av

    root, _ = world
    msr = root / "raw/msrvtt"
    data = json.loads((msr / "MSRVTT_data.json").read_text())
    assert {"info", "videos", "sentences"} <= set(data)
    assert {"id", "video_id", "category", "url", "start time", "end time", "split"} <= set(data["videos"][0])
    assert {"sen_id", "video_id", "caption"} == set(data["sentences"][0])
    with open(msr / "MSRVTT_JSFUSION_test.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["key", "vid_key", "video_id", "sentence"]
    with open(msr / "MSRVTT_train.9k.csv", newline="") as f:
        train = list(csv.reader(f))
    assert train[0] == ["video_id"] and len(train) - 1 + len(rows) - 1 == W.SCALES["tiny"].msrvtt[0]
    # same header as the real file
    assert (REAL / "MSRVTT_JSFUSION_test.csv").read_text().splitlines()[0] == ",".join(rows[0])
    with av.open(str(msr / "videos/all/video0.mp4")) as c:
        n = sum(1 for _ in c.decode(video=0))
    assert W.SCALES["tiny"].frames[0] <= n <= W.SCALES["tiny"].frames[1]

    msvd = root / "raw/msvd"
    with open(msvd / "raw-captions.pkl", "rb") as f:
        caps = pickle.load(f)
    lists = {s: (msvd / f"{s}_list.txt").read_text() for s in ("train", "val", "test")}
    assert not lists["train"].endswith("\n") and lists["test"].endswith("\n")  # as the real lists
    ids = [v for text in lists.values() for v in text.split()]
    assert sorted(ids) == sorted(caps) and all((msvd / "YouTubeClips" / f"{v}.mp4").is_file() for v in ids)
    assert all(isinstance(t, list) and all(isinstance(w, str) for w in t) for c in caps.values() for t in c)


def test_vqa_gqa_refcoco_formats(world):
    root, _ = world
    qs = json.loads((root / "raw/vqa/v2_OpenEnded_mscoco_train2014_questions.json").read_text())
    anns = json.loads((root / "raw/vqa/v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    assert qs["task_type"] == "Open-Ended" and len(qs["questions"]) == len(anns)
    types = set((REAL / "vqa_mscoco_question_types.txt").read_text().splitlines())  # the real 65 prefixes
    disagree = 0
    for a in anns:
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert a["answer_type"] in ("yes/no", "number", "other") and a["question_type"] in types
        assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
        disagree += len({x["answer"] for x in a["answers"]}) > 1
    assert 0 < disagree < len(anns)  # some annotators disagree, not all

    gqa = json.loads((root / "raw/gqa/train_balanced_questions.json").read_text())
    rec = next(iter(gqa.values()))
    assert {"imageId", "question", "answer", "fullAnswer", "isBalanced", "groups", "entailed", "equivalent",
            "types", "annotations", "semantic", "semanticStr"} <= set(rec)
    assert {r["types"]["structural"] for r in gqa.values()} <= {"query", "verify", "logical", "choose", "compare"}

    with open(root / "raw/refcoco/refcoco/refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    inst = json.loads((root / "raw/refcoco/refcoco/instances.json").read_text())
    boxes = {a["id"]: a["bbox"] for a in inst["annotations"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in inst["images"]}
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    for r in refs:
        x, y, w, h = boxes[r["ann_id"]]
        W_, H_ = sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and x + w <= W_ and y + h <= H_ and w > 0 and h > 0
        assert r["file_name"].endswith(f"_{r['ann_id']}.jpg") and r["sent_ids"]


def test_indexes_built_by_the_real_readers(world):
    root, report = world
    for task, folder in W.TASK_DIRS.items():
        files = sorted((root / folder).glob("*.index.json"))
        assert files, task
        for f in files:
            index = load_index(f, KINDS[task])
            assert index["dataset"] == "shapes"
            assert Path(index["media_root"]).is_relative_to(root.resolve() / W.RAW_DIR)
    itr = {s: len(load_index(root / "itr" / f"{s}.index.json")["items"]) for s in ("train", "val", "test")}
    assert itr == report.counts["itr"]


def test_ambiguity_is_reported_and_near_zero(world):
    _, report = world
    assert set(report.ambiguous) == {"itr_val", "itr_test", "msrvtt_test", "msvd_test"}
    assert all(v <= 0.02 for v in report.ambiguous.values())
    assert "fit more than one scene" in W.summary(report)


def test_same_seed_same_bytes_and_rerun_is_a_noop(world, tmp_path, capsys):
    import importlib.util

    root, _ = world
    spec = importlib.util.spec_from_file_location("shapes_cli", CLI)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    other = tmp_path / "again"
    # another process: encoders that depend on memory layout (libx264 does) would show up here
    done = subprocess.run([sys.executable, str(CLI), "--out", str(other), "--scale", "tiny", "--seed", "0"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    for pattern in ("*.jpg", "*.mp4", "*.json", "*.csv", "*.txt", "*.p", "*.pkl"):
        a, b = _digest(root / W.RAW_DIR, pattern), _digest(other / W.RAW_DIR, pattern)
        assert a == b and a, pattern
    mtimes = {p: p.stat().st_mtime_ns for p in other.rglob("*.index.json")}
    capsys.readouterr()
    assert cli.main(["--out", str(other), "--scale", "tiny", "--seed", "0"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert mtimes == {p: p.stat().st_mtime_ns for p in other.rglob("*.index.json")}
    assert W.ensure_shapes(other, "tiny", seed=0) == other  # present: nothing rebuilt
    assert mtimes == {p: p.stat().st_mtime_ns for p in other.rglob("*.index.json")}
    # another seed: other captions
    W.build_shapes(other, "tiny", seed=1, progress=False)
    caps = [json.loads((d / "raw/itr/dataset_shapes.json").read_text())["images"][0]["sentences"][0]["raw"]
            for d in (root, other)]
    assert json.loads((other / W.MARKER).read_text())["seed"] == 1 and caps[0] != caps[1]


def test_foreign_raw_folder_is_never_overwritten(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "precious.json").write_text("{}")
    with pytest.raises(UserError, match="not written by"):
        W.build_shapes(tmp_path, "tiny", progress=False)
    assert (tmp_path / "raw" / "precious.json").is_file()
    with pytest.raises(UserError, match="unknown scale"):
        W.build_shapes(tmp_path / "x", "huge", progress=False)


# -- the words --------------------------------------------------------------------------------
def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_every_caption_states_its_claim_and_fits_its_scene():
    rng = np.random.default_rng(3)
    for _ in range(300):
        scene = sample_scene(rng)
        for text, claim in image_captions(scene, rng, drop_size_prob=0.5):
            assert claim_matches(claim, scene.canonical), text
            words = _words(text)
            for size, colour, shape in claim[1]:
                assert colour in words and (shape in words or shape + "s" in words), text
                if size is not None:
                    assert words & set(SIZE_WORDS[size]), text
            if all(s is None for s, _, _ in claim[1]):
                assert not words & {w for ws in SIZE_WORDS.values() for w in ws}, text


def test_claims_tell_apart_swapped_and_mirrored_scenes():
    bg = Background("plain", (90, 90, 90), (90, 90, 90), "horizontal", 0.0, 0)
    red, blue = Thing("small", "red", "circle"), Thing("large", "blue", "square")
    scenes = [Scene("row", (red, blue), bg), Scene("row", (blue, red), bg), Scene("column", (red, blue), bg),
              Scene("row", (Thing("small", "blue", "circle"), Thing("large", "red", "square")), bg)]
    rng = np.random.default_rng(0)
    claims = [c for _, c in image_captions(scenes[0], rng, k=5, drop_size_prob=0.0)]
    assert [any(claim_matches(c, s.canonical) for c in claims) for s in scenes] == [True, False, False, False]
    # a caption without sizes fits the size-swapped scene too: the measure must count it
    same_but_sizes = Scene("row", (Thing("large", "red", "circle"), Thing("small", "blue", "square")), bg)
    loose = ("row", ((None, "red", "circle"), (None, "blue", "square")))
    assert ambiguous_share([loose], [scenes[0].canonical, same_but_sizes.canonical], claim_matches) == 1.0
    assert ambiguous_share(claims, [s.canonical for s in scenes], claim_matches) == 0.0


def test_hard_negatives_are_common_in_a_split():
    rng = np.random.default_rng(0)
    split = W._image_split(120, W.SCALES["default"], rng, unique=True)
    bags = [tuple(sorted(map(repr, s.things))) for s, _ in split]
    shared = sum(bags.count(b) > 1 for b in bags)  # same things, other arrangement
    assert shared >= 10
    assert ambiguous_share([c for _, caps in split for _, c in caps], [s.canonical for s, _ in split],
                           claim_matches) == 0.0
    assert perturb(split[0][0], rng) is None or perturb(split[0][0], rng).canonical != split[0][0].canonical


def test_video_captions_fit_their_video_only():
    from mdpd_vl.data.shapes_scenes import sample_video_scene

    rng = np.random.default_rng(1)
    scenes = [sample_video_scene(rng, 64, (8, 16)) for _ in range(40)]
    for s in scenes:
        for text, claim in video_captions(s, rng, 6):
            assert video_claim_matches(claim, s.canonical), text
            assert all(m.motion == "still" or m.thing.colour in text for m in s.movers)


# -- one task at a time ------------------------------------------------------------------------
def test_one_task_builds_alone_with_the_same_bytes(world, tmp_path):
    root, _ = world
    solo = tmp_path / "solo"
    report = W.build_shapes(solo, "tiny", seed=0, progress=False, tasks=["itr"])
    assert report.tasks == ["itr"] and set(report.counts) == {"itr"}
    assert sorted(p.name for p in (solo / W.RAW_DIR).iterdir()) == [W.STAMP, "itr"]  # no video, no question
    assert list(solo.rglob("*.jpg")) and not list(solo.rglob("*.mp4")) and not list(solo.rglob("*.partial"))
    assert sorted(p.name for p in solo.iterdir()) == sorted([W.MARKER, W.RAW_DIR, W.TASK_DIRS["itr"]])
    assert _digest(root / W.RAW_DIR / "itr", "*.*") == _digest(solo / W.RAW_DIR / "itr", "*.*")
    mtimes = {p: p.stat().st_mtime_ns for p in (solo / "itr").glob("*.index.json")}
    W.ensure_shapes(solo, "tiny", 0, tasks=["vqa"])  # a later task joins, the first one stays as it is
    marker = json.loads((solo / W.MARKER).read_text())
    assert marker["tasks"] == ["itr", "vqa"] and set(marker["counts"]) == {"itr", "vqa"}
    assert mtimes == {p: p.stat().st_mtime_ns for p in (solo / "itr").glob("*.index.json")}
    assert _digest(root / W.RAW_DIR / "vqa", "*.*") == _digest(solo / W.RAW_DIR / "vqa", "*.*")
    assert W.build_shapes(solo, "tiny", 0, progress=False, tasks=["itr", "vqa"]).up_to_date


def test_a_missing_optional_package_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    root = tmp_path / "shapes"
    for tasks in (["msrvtt"], ["itr", "msvd"], None):
        with pytest.raises(UserError) as err:
            W.ensure_shapes(root, "tiny", 0, tasks=tasks)
        assert '".[video]"' in str(err.value) and "\n" not in str(err.value)
        assert not root.exists()  # checked before anything is written: no raw/, no partial folder
    W.ensure_shapes(root, "tiny", 0, tasks=["itr"])  # what needs no video still builds
    assert not list(root.rglob("*.partial"))


def test_a_failing_task_leaves_no_partial_folder(tmp_path, monkeypatch):
    def boom(folder, *args):
        (folder / "half.json").write_text("{")
        raise RuntimeError("interrupted")

    monkeypatch.setitem(W.WRITERS, "gqa", boom)
    with pytest.raises(RuntimeError):
        W.build_shapes(tmp_path, "tiny", 0, progress=False, tasks=["itr", "gqa"])
    assert not list(tmp_path.rglob("*.partial")) and not (tmp_path / W.RAW_DIR / "gqa").exists()
    assert json.loads((tmp_path / W.MARKER).read_text())["tasks"] == ["itr"]  # the finished task stays
    with pytest.raises(UserError, match="unknown task 'vtr'; valid: itr"):
        W.build_shapes(tmp_path, "tiny", 0, progress=False, tasks=["vtr"])


def _indexes(root: Path) -> dict[str, object]:
    """Every index of a build, its own folder written as ROOT. The fingerprint is left out: it hashes
    the files' mtimes (a staleness check), so it differs between any two builds, even of the whole world."""
    out = {}
    for p in sorted(root.rglob("*.index.json")):
        index = json.loads(p.read_text().replace(str(root.resolve()), "ROOT"))
        assert index.pop("fingerprint")
        out[p.relative_to(root).as_posix()] = index
    return out


def test_each_task_alone_gives_the_indexes_of_a_whole_world_build(world, tmp_path):
    root, _ = world
    whole = _indexes(root)
    assert {k.split("/")[0] for k in whole} == set(W.TASK_DIRS.values())
    for task, folder in W.TASK_DIRS.items():
        solo = tmp_path / task
        W.build_shapes(solo, "tiny", seed=0, progress=False, tasks=[task])
        mine = _indexes(solo)
        assert mine and all(k.startswith(f"{folder}/") for k in mine), task  # this task's indexes only
        assert mine == {k: v for k, v in whole.items() if k.startswith(f"{folder}/")}, task
        assert _digest(solo / W.RAW_DIR / task, "*.*") == _digest(root / W.RAW_DIR / task, "*.*"), task


def test_a_task_version_bump_rebuilds_that_task_only(tmp_path, monkeypatch):
    root = tmp_path / "w"
    W.build_shapes(root, "tiny", 0, progress=False, tasks=["itr", "gqa"])
    itr_times = {p: p.stat().st_mtime_ns for p in (root / "itr").glob("*.index.json")}
    gqa_times = {p: p.stat().st_mtime_ns for p in (root / W.TASK_DIRS["gqa"]).glob("*.index.json")}
    assert W.build_shapes(root, "tiny", 0, progress=False, tasks=["itr", "gqa"]).up_to_date
    monkeypatch.setitem(W.TASK_VERSIONS, "gqa", W.TASK_VERSIONS.get("gqa", 1) + 1)
    assert W._current(root, "tiny", 0, ["itr"]) is not None and W._current(root, "tiny", 0, ["gqa"]) is None
    report = W.build_shapes(root, "tiny", 0, progress=False, tasks=["itr", "gqa"])
    assert not report.up_to_date and sorted(report.tasks) == ["gqa", "itr"]
    assert itr_times == {p: p.stat().st_mtime_ns for p in (root / "itr").glob("*.index.json")}  # kept
    assert gqa_times != {p: p.stat().st_mtime_ns for p in (root / W.TASK_DIRS["gqa"]).glob("*.index.json")}
    marker = json.loads((root / W.MARKER).read_text())
    assert marker["task_versions"]["gqa"] == W.TASK_VERSIONS["gqa"]
    assert W.build_shapes(root, "tiny", 0, progress=False, tasks=["itr", "gqa"]).up_to_date


def test_the_large_scale_is_the_default_with_more_grounding_images():
    import dataclasses

    large, default = W.SCALES["large"], W.SCALES["default"]
    assert dataclasses.replace(large, refcoco=default.refcoco) == default  # every other task as default
    assert large.refcoco[0] > default.refcoco[0] and large.refcoco[1:] == default.refcoco[1:]  # same eval sizes
