"""MSVD as CLIP4Clip uses it.

Layout (`--raw DIR`): `raw-captions.pkl` (a pickled `dict[video_id, list[list[token]]]`) and
`train_list.txt`, `val_list.txt`, `test_list.txt` (one clip id a line; a missing final newline is
fine), in `DIR/` or `DIR/msvd_data/` (CLIP4Clip's msvd_data.zip); videos anywhere under
`DIR/YouTubeClips/`, `DIR/videos/` or `DIR/` (found by walking the folder; the id is the file name
minus its extension; the originals are `.avi`). Each video keeps all its captions (their number varies).

`raw-captions.pkl` is a pickle, and unpickling runs whatever code the file names: it must come from a
trusted source (the CLIP4Clip release). It is read only from the raw folder you name.
"""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Any

from mdpd_vl.data.prep.common import (
    DatasetInfo,
    PrepReport,
    PrepRun,
    SplitIndex,
    find_input,
    first_dir,
    parse_options,
    read_lines,
)
from mdpd_vl.data.prep.media import check_video
from mdpd_vl.errors import UserError

CODE_VERSION = 1
INFO = DatasetInfo(
    "msvd", {"train": 1200, "val": 100, "test": 670}, "videos",
    ("https://github.com/ArrowLuo/CLIP4Clip (README: msvd_data.zip with raw-captions.pkl and the lists)",
     "https://www.cs.utexas.edu/users/ml/clamp/videoDescription/YouTubeClips.tar (videos)"))
SPLITS = ("train", "val", "test")
ANN_DIRS = ("", "msvd_data")
VIDEO_DIRS = ("YouTubeClips", "videos", ".")
VIDEO_EXTS = {".avi", ".mp4", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv"}
DEFAULTS: dict[str, Any] = {"min_frames": 1, "video_dir": None}


def prepare(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False, **options: Any) -> PrepReport:
    """MSVD originals in `raw` -> `<out>/{train,val,test}.index.json` (kind video_text). Options:
    `min_frames` (fewer decodable frames = bad video), `video_dir`."""
    raw, out = Path(raw), Path(out)
    opts = parse_options(options, DEFAULTS, "msvd prep")
    if not raw.is_dir():
        raise UserError(f"raw folder not found; {INFO.where_to_get()}", where=str(raw))
    pkl = find_input(raw, ["raw-captions.pkl"], INFO, ANN_DIRS)
    lists = {s: find_input(raw, [f"{s}_list.txt"], INFO, ANN_DIRS) for s in SPLITS}
    assert pkl is not None
    video_dir = first_dir(raw, VIDEO_DIRS, opts["video_dir"], INFO, "video")
    run = PrepRun.start(INFO, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=[pkl, *lists.values()], media_dirs=[video_dir])  # type: ignore[list-item]
    if run.report.up_to_date:
        return run.report

    captions = load_captions(pkl, run)
    videos = walk_videos(video_dir)
    used: dict[Path, set[str]] = {}
    items: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for split, path in lists.items():
        vids = read_lines(path)  # type: ignore[arg-type]
        if not vids:  # a split list with no id is a cut download, not an empty split
            raise UserError(f"is empty (expected one clip id a line); {INFO.where_to_get()}", where=str(path))
        for vid in vids:
            caps = captions.get(vid, [])
            if not caps:
                run.bad(pkl, f"{vid}: empty caption list ({path.name} names it)", split)  # type: ignore[union-attr]
                continue
            video = videos.get(vid)
            if video is None:
                run.bad(video_dir / f"{vid}.avi", f"missing (no file named {vid}.* under the video folder; "
                        f"{path.name} lists it)", split)
                continue
            used.setdefault(video, set()).add(split)
            items[split].append({"video": video.relative_to(video_dir).as_posix(), "video_id": vid,
                                 "captions": caps})
    bad = run.verify(used, functools.partial(check_video, min_frames=int(opts["min_frames"])))
    return run.finish([SplitIndex(s, "video_text", video_dir,
                                  [it for it in items[s] if video_dir / it["video"] not in bad]) for s in SPLITS])


def load_captions(pkl: Path, run: PrepRun) -> dict[str, list[str]]:
    """video_id -> captions (tokens joined by spaces) from `raw-captions.pkl`. The pickle must come
    from a trusted source: unpickling can run code. Malformed captions are recorded as bad inputs."""
    try:
        with open(pkl, "rb") as f:
            data = pickle.load(f)  # trusted file from the user's own raw folder (see module docstring)
    except OSError as err:
        raise UserError(f"cannot read ({err.strerror or type(err).__name__})", where=str(pkl)) from None
    except Exception as err:  # a cut or corrupt pickle fails in many ways (EOFError, KeyError, ...)
        raise UserError(f"not a readable pickle ({type(err).__name__}: {err}); the file looks truncated or "
                        f"corrupt; {INFO.where_to_get()}", where=str(pkl)) from None
    if not isinstance(data, dict):
        raise UserError(f"expected a dict video_id -> captions, got {type(data).__name__}", where=str(pkl))
    out: dict[str, list[str]] = {}
    for vid, caps in data.items():
        if not isinstance(caps, (list, tuple)):
            run.bad(pkl, f"{vid}: captions are a {type(caps).__name__}, expected a list of token lists")
            continue
        wrong = next((k for k, c in enumerate(caps) if not (isinstance(c, str) or (
            isinstance(c, (list, tuple)) and all(isinstance(t, str) for t in c)))), None)
        if wrong is not None:
            run.bad(pkl, f"{vid}: caption {wrong} is not text (a list of token strings or a string)")
            continue
        joined = [" ".join(c).strip() if isinstance(c, (list, tuple)) else c.strip() for c in caps]
        if not all(joined):
            run.bad(pkl, f"{vid}: caption {joined.index('')} is blank")
            continue
        out[str(vid)] = joined
    return out


def walk_videos(video_dir: Path) -> dict[str, Path]:
    """Clip id (file name minus extension) -> path, for every video file under `video_dir`."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(video_dir):
        dirnames.sort()  # deterministic choice when an id exists twice
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() in VIDEO_EXTS:
                found.setdefault(path.stem, path)
    return found
