"""MSR-VTT as CLIP4Clip uses it (the 1k-A split).

Layout (`--raw DIR`): `MSRVTT_data.json` (`{"videos": [...], "sentences": [{"video_id", "caption"}]}`),
`MSRVTT_train.9k.csv` or `MSRVTT_train.7k.csv` (column `video_id`) and `MSRVTT_JSFUSION_test.csv`
(columns `key,vid_key,video_id,sentence`), in `DIR/` or `DIR/msrvtt_data/` (how CLIP4Clip's
msrvtt_data.zip unpacks); videos `{video_id}.mp4` (`.webm` as fallback) in `DIR/videos/all/`
(Frozen-in-Time's MSRVTT.zip), `DIR/videos/` or `DIR/`.

Index: `train` has one item per video with all its captions (a loader draws one per step), or with
`expand_sentences` one item per (video, caption) pair as CLIP4Clip's `--expand_msrvtt_sentences`;
`test` has one item per row of the JSFUSION CSV (1,000 videos, one sentence each).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from mdpd_vl.data.prep.common import (
    DatasetInfo,
    PrepReport,
    PrepRun,
    SplitIndex,
    choose,
    expect,
    find_input,
    first_dir,
    parse_options,
    read_csv,
    read_json,
)
from mdpd_vl.data.prep.media import check_video
from mdpd_vl.errors import UserError

CODE_VERSION = 1
_URLS = ("https://github.com/ArrowLuo/CLIP4Clip (README: msrvtt_data.zip with MSRVTT_data.json and the CSVs)",
         "https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip (videos)")
INFO = {
    "9k": DatasetInfo("msrvtt", {"train": 9000, "test": 1000}, "videos", _URLS),
    "7k": DatasetInfo("msrvtt", {"train": 7010, "test": 1000}, "videos", _URLS),
}
ANN_DIRS = ("", "msrvtt_data", "annotations")
VIDEO_DIRS = ("videos/all", "MSRVTT/videos/all", "videos", ".")
VIDEO_EXTS = (".mp4", ".webm")
DEFAULTS: dict[str, Any] = {"train_csv": "9k", "expand_sentences": False, "min_frames": 1, "video_dir": None}


def prepare(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False, **options: Any) -> PrepReport:
    """MSR-VTT originals in `raw` -> `<out>/{train,test}.index.json` (kind video_text). Options:
    `train_csv` 9k | 7k, `expand_sentences`, `min_frames` (fewer decodable frames = bad video), `video_dir`."""
    raw, out = Path(raw), Path(out)
    opts = parse_options(options, DEFAULTS, "msrvtt prep")
    train = choose(str(opts["train_csv"]), tuple(INFO), "msrvtt prep", "train_csv")
    info = INFO[train]
    if not raw.is_dir():
        raise UserError(f"raw folder not found; {info.where_to_get()}", where=str(raw))
    data_json = find_input(raw, ["MSRVTT_data.json"], info, ANN_DIRS)
    train_csv = find_input(raw, [f"MSRVTT_train.{train}.csv"], info, ANN_DIRS)
    test_csv = find_input(raw, ["MSRVTT_JSFUSION_test.csv"], info, ANN_DIRS)
    assert data_json and train_csv and test_csv
    video_dir = first_dir(raw, VIDEO_DIRS, opts["video_dir"], info, "video")
    run = PrepRun.start(info, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=[data_json, train_csv, test_csv], media_dirs=[video_dir])
    if run.report.up_to_date:
        return run.report

    captions = _captions(data_json, info, run)
    used: dict[Path, set[str]] = {}
    train_items: list[dict[str, Any]] = []
    for row in read_csv(train_csv, ["video_id"]):
        vid = row["video_id"]
        caps = captions.get(vid, [])
        if not caps:
            run.bad(data_json, f"{vid}: empty caption list (no sentences for this train video)", "train")
            continue
        video = _video(video_dir, vid, "train", run)
        if video is not None:
            used.setdefault(video, set()).add("train")
            rel = video.relative_to(video_dir).as_posix()
            groups = [[c] for c in caps] if opts["expand_sentences"] else [caps]
            train_items += [{"video": rel, "video_id": vid, "captions": g} for g in groups]
    test_items: list[dict[str, Any]] = []
    for r, row in enumerate(read_csv(test_csv, ["video_id", "sentence"]), start=2):
        vid = row["video_id"]
        if not row["sentence"]:
            run.bad(test_csv, f"line {r} ({vid}): empty caption list (blank sentence)", "test")
            continue
        video = _video(video_dir, vid, "test", run)
        if video is not None:
            used.setdefault(video, set()).add("test")
            test_items.append({"video": video.relative_to(video_dir).as_posix(), "video_id": vid,
                               "captions": [row["sentence"]]})

    bad = {p.relative_to(video_dir).as_posix() for p in run.verify(
        used, functools.partial(check_video, min_frames=int(opts["min_frames"])))}
    train_items = [it for it in train_items if it["video"] not in bad]
    test_items = [it for it in test_items if it["video"] not in bad]
    return run.finish([
        SplitIndex("train", "video_text", video_dir, train_items,
                   count=len({it["video_id"] for it in train_items})),
        SplitIndex("test", "video_text", video_dir, test_items),
    ])


def _captions(path: Path, info: DatasetInfo, run: PrepRun) -> dict[str, list[str]]:
    """video_id -> captions in file order, from `MSRVTT_data.json` `sentences`."""
    data = read_json(path, info)
    expect(isinstance(data, dict) and isinstance(data.get("sentences"), list),
           "expected {'videos': [...], 'sentences': [...]}", path, "sentences")
    out: dict[str, list[str]] = {}
    for k, sent in enumerate(data["sentences"]):
        vid = sent.get("video_id") if isinstance(sent, dict) else None
        cap = sent.get("caption") if isinstance(sent, dict) else None
        if not isinstance(vid, str) or not isinstance(cap, str) or not cap.strip():
            run.bad(path, f"sentences[{k}]: needs a 'video_id' and a non-blank 'caption'")
            continue
        out.setdefault(vid, []).append(cap.strip())
    return out


def _video(video_dir: Path, vid: str, split: str, run: PrepRun) -> Path | None:
    """`{vid}.mp4`, else `{vid}.webm`, as CLIP4Clip looks them up; None (recorded) when neither exists."""
    for ext in VIDEO_EXTS:
        path = video_dir / f"{vid}{ext}"
        if path.is_file():
            return path
    run.bad(video_dir / f"{vid}.mp4", "missing (no .mp4 or .webm)", split)
    return None
