"""Media checks of the dataset readers: every referenced image, video or feature file must exist and
decode. Each check returns None for a good file, else one short reason ("missing", "does not decode
(...)", ...); heavy libraries (PIL, PyAV, decord, numpy) are imported inside the functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mdpd_vl.errors import UserError


def check_image(path: Path) -> str | None:
    """None if `path` is an image PIL can open, verify and decode (at reduced size); else why not."""
    if not path.is_file():
        return "missing"
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        # verify() reads headers only; a cheap reduced-size decode also catches truncated pixel data.
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as err:  # PIL raises many types for broken files; all mean "does not decode"
        return f"does not decode ({type(err).__name__}: {err})"
    return None


def check_video(path: Path, min_frames: int = 1) -> str | None:
    """None if `path` is a video with at least `max(1, min_frames)` decodable frames; else why not.
    PyAV is used when installed, decord otherwise."""
    if not path.is_file():
        return "missing"
    need = max(1, int(min_frames))
    try:
        n = _count_frames_av(path, need)
    except ImportError:
        n = _count_frames_decord(path, need)
    except Exception as err:  # any container/codec error means the file does not decode
        return f"does not decode ({type(err).__name__}: {err})"
    if isinstance(n, str):
        return n
    if n == 0:
        return "has no decodable video frame"
    if n < need:
        return f"has {n} frames, fewer than min_frames={need}"
    return None


def _count_frames_av(path: Path, need: int) -> int | str:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            return "has no video stream"
        n = 0
        for _ in container.decode(video=0):
            n += 1
            if n >= need:  # stop early: decoding whole videos would make prep slow
                break
        return n


def _count_frames_decord(path: Path, need: int) -> int | str:
    try:
        import decord
    except ImportError:
        raise UserError("checking videos needs PyAV or decord: pip install av") from None
    try:
        reader = decord.VideoReader(str(path))
        if len(reader) > 0:
            reader[0]
        return len(reader)
    except Exception as err:
        return f"does not decode ({type(err).__name__}: {err})"


def check_features(path: Path, rows: int) -> str | None:
    """None if `path` is a 3-D .npy array (images x regions x dim) with `rows` rows; else why not."""
    if not path.is_file():
        return "missing"
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        return f"does not load ({type(err).__name__}: {err})"
    if arr.ndim != 3:
        return f"has shape {tuple(arr.shape)}, expected (images, regions, dim)"
    if arr.shape[0] != rows:
        return f"has {arr.shape[0]} rows, the ids file lists {rows}"
    return None


def verify_files(checks: Mapping[Path, Callable[[], str | None]], workers: int) -> dict[Path, str]:
    """Run each file's check once (threads: the work is file I/O and C decoders); the bad ones."""
    paths = list(checks)
    if not paths:
        return {}
    if workers <= 1 or len(paths) < 8:
        results = [checks[p]() for p in paths]
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda p: checks[p](), paths, chunksize=16))
    return {p: r for p, r in zip(paths, results) if r is not None}
