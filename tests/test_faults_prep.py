"""Faults of every data_prep reader: truncated, empty, mis-encoded, wrong-typed, wrong-shaped and
non-finite annotation files, an --out under a regular file, a full disk while the indexes are written,
a kill in the middle of that write. Each ends with exit status 2 and one `error:` line naming the file
(no traceback), writes nothing, and a later good run works. Tiny self-made originals (no fixtures)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from faults_helpers import error_line, killed, no_space, run_faulty, temp_files, tree
from prep_helpers import jpeg, run_script, video, write_json

# ----------------------------------------------------------------------------- tiny originals


@dataclass
class Raw:
    """A folder of originals, the script that reads it, and its annotation files by role."""

    root: Path
    script: str
    files: dict[str, Path]
    args: tuple[str, ...] = ()


def flickr(root: Path) -> Raw:
    images = []
    for i, split in enumerate(["train", "val", "test"]):
        jpeg(root / "flickr30k-images" / f"{i}.jpg", color=(60 * i, 20, 20))
        images.append({"filename": f"{i}.jpg", "imgid": i, "split": split,
                       "sentences": [{"raw": f"a red circle number {i} {k}", "tokens": []} for k in range(5)]})
    return Raw(root, "flickr30k", {"json": write_json(root / "dataset_flickr30k.json",
                                                      {"images": images, "dataset": "flickr30k"})})


def coco(root: Path) -> Raw:
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        name = f"COCO_val2014_{i:012d}.jpg"
        jpeg(root / "val2014" / name)
        images.append({"filepath": "val2014", "filename": name, "cocoid": i, "split": split,
                       "sentences": [{"raw": f"a blue square {i} {k}"} for k in range(6)]})
    return Raw(root, "coco", {"json": write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})})


def precomp(root: Path) -> Raw:
    (root / "precomp").mkdir(parents=True)
    caps = root / "precomp" / "test_caps.txt"
    caps.write_text("".join(f"a small green triangle {i} {k}\n" for i in range(2) for k in range(5)))
    ids = root / "precomp" / "test_ids.txt"
    ids.write_text("0\n1\n")
    for i in range(2):
        jpeg(root / "flickr30k-images" / f"{10 + i}.jpg")
    mapping = write_json(root / "id_mapping.json", {"0": "10.jpg", "1": "11.jpg"})
    return Raw(root, "flickr30k", {"caps": caps, "ids": ids, "json": mapping}, ("--layout", "precomp"))


def msrvtt(root: Path) -> Raw:
    ann = root / "msrvtt_data"
    ann.mkdir(parents=True)
    train, test = ["video0", "video1"], ["video7"]
    sentences = [{"video_id": v, "caption": f"a shape moves {k}", "sen_id": k} for v in train + test for k in range(2)]
    data = write_json(ann / "MSRVTT_data.json", {"videos": [{"video_id": v} for v in train + test],
                                                 "sentences": sentences})
    (ann / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in train))
    # a quoted sentence holding a comma, as CSV writers quote it
    (ann / "MSRVTT_JSFUSION_test.csv").write_text(
        'key,vid_key,video_id,sentence\nret0,msr7,video7,"a large red circle, then a small one"\n')
    for v in train + test:
        video(root / "videos" / "all" / f"{v}.mp4")
    return Raw(root, "msrvtt", {"json": data, "train_csv": ann / "MSRVTT_train.9k.csv",
                                "csv": ann / "MSRVTT_JSFUSION_test.csv"})


def msvd(root: Path) -> Raw:
    ids = {"train": ["clipA_1_5", "clipB_2_9"], "val": ["clipC_0_3"], "test": ["clipD_4_8"]}
    root.mkdir(parents=True)
    files = {}
    for split, vids in ids.items():
        files[f"{split}_list"] = root / f"{split}_list.txt"
        files[f"{split}_list"].write_text("\n".join(vids))  # no final newline, as in the release
        for v in vids:
            video(root / "YouTubeClips" / f"{v}.avi", fmt="avi")
    with open(root / "raw-captions.pkl", "wb") as f:
        pickle.dump({v: [["a", "shape", "spins", str(k)] for k in range(2)] for vs in ids.values() for v in vs}, f)
    files["pickle"] = root / "raw-captions.pkl"
    files["lines"] = files["train_list"]
    return Raw(root, "msvd", files)


def _coco_name(i: int) -> str:
    return f"COCO_train2014_{i:012d}.jpg"


def refer(root: Path) -> Raw:
    images = [{"id": i, "file_name": _coco_name(i), "width": 64, "height": 48} for i in (1, 2)]
    anns = [{"id": 10 + k, "image_id": 1 + k % 2, "bbox": [1.0, 2.0, 10.0, 12.0]} for k in range(4)]
    refs = [{"ref_id": k, "ann_id": 10 + k, "image_id": 1 + k % 2, "split": s,
             "sentences": [{"sent_id": 100 + k, "sent": f"the left circle {k}"}]}
            for k, s in enumerate(["train", "val", "testA", "testB"])]
    inst = write_json(root / "refcoco" / "instances.json", {"images": images, "annotations": anns})
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    for i in (1, 2):
        jpeg(root / "train2014" / _coco_name(i), size=(64, 48))
    return Raw(root, "refcoco", {"json": inst, "pickle": root / "refcoco" / "refs(unc).p"})


def mdetr(root: Path) -> Raw:
    images = [{"id": 5, "original_id": 1, "file_name": _coco_name(1), "caption": "the big square",
               "width": 64, "height": 48}]
    anns = [{"id": 7, "image_id": 5, "bbox": [3.0, 4.0, 20.0, 10.0], "original_id": 70}]
    path = write_json(root / "mdetr_annotations" / "finetune_refcoco_testA.json",
                      {"images": images, "annotations": anns})
    jpeg(root / "train2014" / _coco_name(1), size=(64, 48))
    return Raw(root, "refcoco", {"json": path}, ("--source", "mdetr"))


def vqav2(root: Path) -> Raw:
    qs = [{"image_id": 3, "question": "What color is it?", "question_id": 30},
          {"image_id": 3, "question": "How many?", "question_id": 31}]
    answers = [{"answer": a, "answer_id": k + 1, "answer_confidence": "yes"} for k, a in enumerate(["red"] * 10)]
    anns = [{"question_id": q["question_id"], "image_id": 3, "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": "red", "answers": answers} for q in qs]
    qf = write_json(root / "v2_OpenEnded_mscoco_train2014_questions.json", {"questions": qs})
    af = write_json(root / "v2_mscoco_train2014_annotations.json", {"annotations": anns})
    jpeg(root / "images" / "train2014" / "COCO_train2014_000000000003.jpg")
    return Raw(root, "vqav2", {"json": qf, "answers": af}, ("--min-count", "1"))


def gqa(root: Path) -> Raw:
    recs = {"q1": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "types": {"structural": "verify"}},
            "q2": {"imageId": "n1", "question": "What is it?", "answer": "ball", "types": {"structural": "query"}}}
    path = write_json(root / "train_balanced_questions.json", recs)
    jpeg(root / "images" / "n1.jpg")
    return Raw(root, "gqa", {"json": path})


READERS: dict[str, Callable[[Path], Raw]] = {
    "flickr30k": flickr, "flickr30k-precomp": precomp, "coco": coco, "msrvtt": msrvtt, "msvd": msvd,
    "refcoco": refer, "refcoco-mdetr": mdetr, "vqav2": vqav2, "gqa": gqa,
}


def _run(raw: Raw, out: Path, *extra: str) -> int:
    return run_script(raw.script, ["--raw", str(raw.root), "--out", str(out), "--workers", "1", *raw.args, *extra])


# ----------------------------------------------------------------------------- faults of a file


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _mis_encode(path: Path) -> None:
    data = path.read_bytes()
    at = max(data.rfind(b"a "), 0)  # inside a caption or question: a latin-1 byte where UTF-8 must be
    path.write_bytes(data[:at] + b"caf\xe9 " + data[at:])


def _json_edit(path: Path, edit: Callable[[object], object]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _first(items):
    return items[0] if isinstance(items, list) else next(iter(items.values()))


def _wrong_type(raw: Raw) -> str:
    """Give one field of one record the wrong type; returns what the report must mention."""
    path = raw.files.get("json", raw.root / "none")
    kind = raw.root.name
    if kind in ("flickr30k", "coco"):
        _json_edit(path, lambda d: {**d, "images": [{**d["images"][0], "split": ["train"]}, *d["images"][1:]]})
        return "split"
    if kind == "flickr30k-precomp":
        _json_edit(path, lambda d: {**d, "0": 10})
        return "id_mapping.json"
    if kind == "msrvtt":
        _json_edit(path, lambda d: {**d, "sentences": [{"video_id": "video0", "caption": 7}, *d["sentences"]]})
        return "sentences[0]"
    if kind == "refcoco":
        _json_edit(path, lambda d: {**d, "annotations": [{**d["annotations"][0], "id": [10]}, *d["annotations"][1:]]})
        return "ann_id"
    if kind == "refcoco-mdetr":
        _json_edit(path, lambda d: {**d, "images": [{**d["images"][0], "caption": ["the", "big"]}]})
        return "blank caption"
    if kind == "vqav2":
        _json_edit(path, lambda d: {"questions": [{**d["questions"][0], "question_id": [30]}, *d["questions"][1:]]})
        return "questions[0]"
    if kind == "gqa":
        _json_edit(path, lambda d: {**d, "q1": {**d["q1"], "question": 5}})
        return "question q1"
    if kind == "msvd":
        with open(raw.files["pickle"], "wb") as f:
            pickle.dump({"clipA_1_5": [[b"a", b"shape"]], "clipB_2_9": [["x"]], "clipC_0_3": [["y"]],
                         "clipD_4_8": [["z"]]}, f)
        return "clipA_1_5: caption 0 is not text"
    raise AssertionError(kind)


def _top_level_wrong(raw: Raw) -> str:
    path = raw.files["json"]
    path.write_text("[1, 2, 3]" if raw.root.name != "flickr30k-precomp" else '["a"]')
    return path.name


# (fault name, applies to, mutate(raw) -> text the error output must contain)
FAULTS: list[tuple[str, Callable[[Raw], bool], Callable[[Raw], str]]] = [
    ("json truncated", lambda r: "json" in r.files, lambda r: (_cut(r.files["json"]), "not valid JSON")[1]),
    ("json empty", lambda r: "json" in r.files, lambda r: (r.files["json"].write_bytes(b""), "not valid JSON")[1]),
    ("json mis-encoded", lambda r: "json" in r.files, lambda r: (_mis_encode(r.files["json"]), "not UTF-8")[1]),
    ("json binary", lambda r: "json" in r.files,
     lambda r: (r.files["json"].write_bytes(b"\x00\x01PK\x03\x04"), "NUL byte")[1]),
    ("json wrong top level", lambda r: "json" in r.files, _top_level_wrong),
    ("field of wrong type", lambda r: "json" in r.files or "pickle" in r.files, _wrong_type),
    ("csv cut in a quoted field", lambda r: "csv" in r.files,
     lambda r: (_cut(r.files["csv"], 0.85), "MSRVTT_JSFUSION_test.csv: line 2: ends inside this line")[1]),
    ("csv quoted field never closed", lambda r: "csv" in r.files,
     lambda r: (r.files["csv"].write_text('key,vid_key,video_id,sentence\nret0,msr7,video7,"a large\n'),
                "JSFUSION_test.csv: line 2: not valid CSV")[1]),
    ("csv cut in its last line", lambda r: "csv" in r.files,
     lambda r: (r.files["train_csv"].write_text("video_id\nvideo0\nvid"), "train.9k.csv: line 3: ends inside")[1]),
    ("csv row too wide", lambda r: "csv" in r.files,
     lambda r: (r.files["csv"].write_text("key,vid_key,video_id,sentence\nret0,msr7,video7,a circle,extra\n"),
                "line 2: 5 fields, the header has 4")[1]),
    ("csv empty", lambda r: "csv" in r.files, lambda r: (r.files["csv"].write_bytes(b""), "is empty")[1]),
    ("csv mis-encoded", lambda r: "csv" in r.files,
     lambda r: (_mis_encode(r.files["csv"]), "JSFUSION_test.csv: line 2: not UTF-8")[1]),
    ("csv missing column", lambda r: "csv" in r.files,
     lambda r: (r.files["csv"].write_text("key,video_id\nret0,video7\n"), "no column 'sentence'")[1]),
    ("captions cut in their last line", lambda r: "caps" in r.files,
     lambda r: (_cut(r.files["caps"], 0.97), "test_caps.txt: line 10: ends inside this line")[1]),
    ("captions mis-encoded", lambda r: "caps" in r.files,
     lambda r: (_mis_encode(r.files["caps"]), "test_caps.txt: line 10: not UTF-8")[1]),
    ("captions empty", lambda r: "caps" in r.files,
     lambda r: (r.files["caps"].write_bytes(b""), "0 captions for 2 ids")[1]),
    ("ids not integers", lambda r: "ids" in r.files,
     lambda r: (r.files["ids"].write_text("0\nI\n"), "test_ids.txt: line 2: expected integer ids")[1]),
    ("list mis-encoded", lambda r: "lines" in r.files,
     lambda r: (r.files["lines"].write_bytes(b"clipA_1_5\nclip\xffB"), "train_list.txt: line 2: not UTF-8")[1]),
    ("list truncated", lambda r: "lines" in r.files,
     lambda r: (_cut(r.files["lines"], 0.7), "train_list.txt names it")[1]),
    ("list empty", lambda r: "lines" in r.files,
     lambda r: (r.files["lines"].write_bytes(b""), "train_list.txt: is empty")[1]),
    ("pickle truncated", lambda r: "pickle" in r.files,
     lambda r: (_cut(r.files["pickle"]), "not a readable pickle")[1]),
    ("pickle empty", lambda r: "pickle" in r.files,
     lambda r: (r.files["pickle"].write_bytes(b""), "not a readable pickle")[1]),
    ("pickle of the wrong type", lambda r: "pickle" in r.files,
     lambda r: (r.files["pickle"].write_bytes(pickle.dumps("a string")), "expected a")[1]),
    ("bbox non-finite", lambda r: r.root.name.startswith("refcoco"),
     lambda r: (_json_edit(r.files["json"], lambda d: {**d, "annotations": [
         {**a, "bbox": [float("nan"), 1.0, 2.0, 3.0]} for a in d["annotations"]]}), "bbox")[1]),
    ("bbox wrong shape", lambda r: r.root.name.startswith("refcoco"),
     lambda r: (_json_edit(r.files["json"], lambda d: {**d, "annotations": [
         {**a, "bbox": [1.0, 2.0, 3.0]} for a in d["annotations"]]}), "bbox")[1]),
    ("image size non-finite", lambda r: r.root.name.startswith("refcoco"),
     lambda r: (_json_edit(r.files["json"], lambda d: {**d, "images": [
         {**i, "width": float("inf")} for i in d["images"]]}), "has width inf")[1]),
]

def _probe_roles() -> dict[str, set[str]]:
    """Which file roles each reader has (built once in a temp folder at collection time)."""
    import tempfile

    roles = {}
    with tempfile.TemporaryDirectory() as tmp:
        for reader, build in READERS.items():
            raw = build(Path(tmp) / reader)
            roles[reader] = set(raw.files)
    return roles


ROLES = _probe_roles()
CASES = [(reader, name) for reader in READERS for name, applies, _ in FAULTS
         if applies(Raw(Path(reader), "", {r: Path(r) for r in ROLES[reader]}))]


@pytest.mark.parametrize(("reader", "fault"), CASES)
def test_bad_annotation_file_is_exit_2_one_line_nothing_written(tmp_path: Path, capsys, reader: str,
                                                                 fault: str) -> None:
    raw = READERS[reader](tmp_path / reader)
    out = tmp_path / "out"
    mutate = next(m for name, _, m in FAULTS if name == fault)
    expected = mutate(raw)
    assert _run(raw, out) == 2
    err = capsys.readouterr().err
    error_line(err)
    assert expected in err, err
    assert not out.exists() or tree(out) == {}  # nothing written
    # the originals repaired, the same command works
    good = READERS[reader](tmp_path / "again" / reader)
    assert _run(good, out) == 0 and temp_files(out) == []


@pytest.mark.parametrize("reader", READERS)
def test_out_under_a_regular_file_fails_before_the_media_check(tmp_path: Path, capsys, reader: str) -> None:
    raw = READERS[reader](tmp_path / reader)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert _run(raw, blocker / "index") == 2
    err = capsys.readouterr().err
    error_line(err, str(blocker / "index"), "--out", "regular file")
    assert "checking" not in err  # no media file was opened
    assert _run(raw, blocker) == 2 and "is a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("reader", READERS)
def test_full_disk_while_writing_the_indexes(tmp_path: Path, capsys, monkeypatch, reader: str) -> None:
    raw = READERS[reader](tmp_path / reader)
    out = tmp_path / "out"
    assert _run(raw, out) == 0
    before = tree(out)
    refused = no_space(monkeypatch, "*.index.json", after=10)
    assert _run(raw, out, "--force") == 2
    line = error_line(capsys.readouterr().err, ".index.json: cannot write (No space left on device); it needs")
    assert refused and "bytes free there" in line
    assert tree(out) == before and temp_files(out) == []  # the earlier indexes are untouched
    monkeypatch.undo()
    assert _run(raw, out, "--force") == 0 and temp_files(out) == []


@pytest.mark.parametrize("reader", READERS)
def test_kill_while_writing_the_indexes_then_a_good_run(tmp_path: Path, reader: str) -> None:
    raw = READERS[reader](tmp_path / reader)
    out = tmp_path / "out"
    args = ["--raw", str(raw.root), "--out", str(out), "--workers", "1", *raw.args]
    script = ["--script", f"data_prep/{raw.script}.py"]
    done = run_faulty(script, args, kill_fsync=f"{out}/.*.index.json.*.tmp", timeout=120)
    assert killed(done), done.stderr[-2000:]
    assert not list(out.glob("*.index.json")) and temp_files(out)  # a temp file, no half index
    again = run_faulty(script, args, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert temp_files(out) == [] and list(out.glob("*.index.json"))


def test_a_real_file_size_limit_while_writing_an_index(tmp_path: Path) -> None:
    raw = flickr(tmp_path / "flickr30k")
    out = tmp_path / "out"
    done = run_faulty(["--script", "data_prep/flickr30k.py"], ["--raw", str(raw.root), "--out", str(out)],
                      fsize=300, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    error_line(done.stderr, "index.json: cannot write (File too large); it needs")
    assert tree(out) == {}


@pytest.mark.parametrize("name", ["flickr30k", "coco", "msrvtt", "msvd", "refcoco", "vqav2", "gqa"])
def test_no_arguments_says_where_the_originals_are(capsys, name: str) -> None:
    assert run_script(name, []) == 2
    line = error_line(capsys.readouterr().err, f"data_prep/{name}.py needs --raw DIR", "--out DIR")
    assert "originals are published at: http" in line
