"""Video frame sampling: decord first, PyAV when decord is missing or fails on a file.

Two ways to choose frames, both CLIP4Clip's:
- `fps=None`: `max_frames` indices spread uniformly over all frames (`np.linspace(0, n - 1,
  max_frames)`, as CLIP4Clip's `slice_framepos=2`).
- `fps=k` (1 in CLIP4Clip): the frames CLIP4Clip's OpenCV loop extracts at k per second (frame
  `sec * int(fps) + j * (int(fps) // k)` for every second, up to the last frame), then, if there are
  more than `max_frames`, a uniform `np.linspace` slice of them (`slice_framepos` 0/1 take the head
  or the tail instead).

`CLIP4CLIP` is the sampling of CLIP4Clip's published commands (`--feature_framerate 1
--max_frames 12 --slice_framepos 2`): one frame per second, then a linspace slice down to 12.

A video with fewer candidate frames than `max_frames` is **short**. Policy `short="mask"` (the
default, CLIP4Clip's): return the frames there are; the collate function pads the time axis with
zeros and marks the padding False in `frame_mask`. Policy `short="repeat"`: repeat frames evenly
(`linspace` with repeats) up to `max_frames`, all valid. Either way `Clip.short` is True and the
datasets count it. Policy `short="skip"`: a short video raises `ShortVideo`, which the training
datasets skip and count like an unreadable file.

Frame cache (`cache=ArrayCache(...)`): the sampled uint8 frames of a video are written once (one
`.npz` per video and sampling, atomically, see `data/cache.py`), so later epochs decode nothing. A
file no backend can decode is remembered in the cache as well (its error message), so it is not
decoded again either; the entry is keyed by the file's size and mtime, so a repaired file is read
afresh. `Clip.decode_seconds` is the wall time spent reading (decoding, or loading from the cache).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdpd_vl.data.cache import ArrayCache

BACKENDS = ("auto", "decord", "av")
SHORT_POLICIES = ("mask", "repeat", "skip")


class ShortVideo(ValueError):
    """A video with fewer candidate frames than `max_frames` under `short="skip"`."""


@dataclass(frozen=True)
class FrameSampling:
    """Which frames to read from a video (see the module docstring)."""

    max_frames: int = 12
    fps: int | None = None  # None: uniform over all frames; k: CLIP4Clip's k-per-second extraction
    slice_framepos: int = 2  # when too many frames: 0 head, 1 tail, 2 uniform
    short: str = "mask"  # mask | repeat | skip
    size: int | None = None  # resize the shorter side to this when decoding (smaller cache entries)

    def __post_init__(self) -> None:
        if self.max_frames < 1:
            raise ValueError("max_frames must be >= 1")
        if self.fps is not None and (self.fps < 1 or int(self.fps) != self.fps):
            raise ValueError("fps must be a whole number >= 1 (CLIP4Clip's sample_fp), or None for uniform")
        if self.slice_framepos not in (0, 1, 2):
            raise ValueError("slice_framepos must be 0 (head), 1 (tail) or 2 (uniform)")
        if self.short not in SHORT_POLICIES:
            raise ValueError(f"short must be one of {', '.join(SHORT_POLICIES)}")


@dataclass
class Clip:
    """Decoded frames (`T x H x W x 3` uint8) and where they came from."""

    frames: np.ndarray
    indices: np.ndarray  # source frame index of each row
    num_frames: int  # frames in the file
    fps: float
    short: bool  # fewer candidate frames than max_frames
    backend: str  # decord | av | cache
    decode_seconds: float = 0.0  # wall time of reading the frames (decode or cache load)


def clip4clip_sampling(max_frames: int = 12, **kw: object) -> FrameSampling:
    """CLIP4Clip's frames: 1 per second (`feature_framerate 1`), linspace down to `max_frames`
    (`slice_framepos 2`), short videos masked."""
    return FrameSampling(max_frames=max_frames, fps=1, slice_framepos=2, **kw)  # type: ignore[arg-type]


def uniform_indices(num_frames: int, max_frames: int) -> np.ndarray:
    """`max_frames` indices spread over `num_frames` (all of them when there are fewer)."""
    if num_frames <= max_frames:
        return np.arange(num_frames)
    return np.linspace(0, num_frames - 1, num=max_frames, dtype=int)


def fps_indices(num_frames: int, native_fps: float, sample_fp: int = 1) -> np.ndarray:
    """The frames CLIP4Clip's `RawVideoExtractorCV2.video_to_tensor(sample_fp=k)` reads, in order."""
    fps = int(native_fps)  # OpenCV's CAP_PROP_FPS truncated, as CLIP4Clip does
    if fps < 1:
        fps = 1  # CLIP4Clip would divide by zero here; one frame a second is the closest reading
    k = int(sample_fp)
    interval = max(fps // k, 1)
    offsets = np.arange(0, fps, interval)[:k]
    total_seconds = (num_frames + fps - 1) // fps
    idx = (np.arange(total_seconds + 1)[:, None] * fps + offsets[None, :]).reshape(-1)
    return idx[idx < num_frames]  # its loop stops at the first frame that cannot be read


def select_indices(num_frames: int, native_fps: float, sampling: FrameSampling) -> tuple[np.ndarray, bool]:
    """Frame indices to decode under `sampling`, and whether the video is short."""
    if num_frames < 1:
        raise ValueError("the video has no frames")
    if sampling.fps is None:
        cand = np.arange(num_frames)
    else:
        cand = fps_indices(num_frames, native_fps, sampling.fps)
    m = sampling.max_frames
    short = len(cand) < m
    if short:
        if sampling.short == "skip":
            raise ShortVideo(f"{len(cand)} candidate frames, fewer than max_frames={m}")
        if sampling.short == "repeat":
            return cand[np.linspace(0, len(cand) - 1, num=m).round().astype(int)], True
        return cand, True
    if len(cand) == m:
        return cand, False
    if sampling.slice_framepos == 0:
        return cand[:m], False
    if sampling.slice_framepos == 1:
        return cand[-m:], False
    return cand[np.linspace(0, len(cand) - 1, num=m, dtype=int)], False


# ------------------------------------------------------------------------------------ backends
Decoded = tuple[np.ndarray, np.ndarray, int, float, bool]  # frames, indices, num_frames, fps, short


def _read_decord(path: str, sampling: FrameSampling) -> Decoded:
    import decord

    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n, fps = len(vr), float(vr.get_avg_fps())
    idx, short = select_indices(n, fps, sampling)
    uniq, inverse = np.unique(idx, return_inverse=True)  # decode each frame once, even when repeated
    frames = vr.get_batch(uniq.tolist()).asnumpy()[inverse]
    return frames, idx, n, fps, short


def _count_packets(container: Any, stream: Any) -> int:
    n = sum(1 for p in container.demux(stream) if p.size)
    container.seek(0)
    return n


def _read_av(path: str, sampling: FrameSampling) -> Decoded:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        n = stream.frames or _count_packets(container, stream)
        for _ in range(2):  # a second pass when the container's frame count was wrong
            idx, short = select_indices(n, fps, sampling)
            wanted, got = set(idx.tolist()), {}
            last = int(idx.max())
            count = 0
            for count, frame in enumerate(container.decode(stream), start=1):
                i = count - 1
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
            if len(got) == len(wanted):
                return np.stack([got[i] for i in idx.tolist()]), idx, n, fps, short
            n = count
            container.seek(0)
    raise ValueError(f"could not decode the frames {sorted(wanted - set(got))}")


def _resize(frames: np.ndarray, size: int | None) -> np.ndarray:
    if size is None:
        return frames
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(new, Image.BICUBIC)) for f in frames])


_warned: set[str] = set()


def read_clip(path: str | Path, sampling: FrameSampling, *, backend: str = "auto",
              cache: ArrayCache | None = None) -> Clip:
    """Decode the frames `sampling` picks from `path` (decord, falling back to PyAV); `cache` keeps
    the result keyed by file, mtime and sampling. Raises OSError on a file neither backend can read
    (also when the cache remembers that), `ShortVideo` for a short video under `short="skip"`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}")
    t0 = time.perf_counter()
    path = str(path)
    params = asdict(sampling)
    cache = cache if cache is not None and cache.enabled and Path(path).is_file() else None
    if cache is not None:
        hit = cache.get(path, params)
        if hit is not None and "error" in hit:
            raise OSError(f"cannot read video {path} (remembered by the frame cache): {hit['error'].item()}")
        if hit is not None:
            return Clip(hit["frames"], hit["indices"], int(hit["meta"][0]), float(hit["meta"][1]),
                        bool(hit["meta"][2]), "cache", time.perf_counter() - t0)
    errors: list[str] = []
    decord_failed = decoded_nothing = False
    for name, reader in (("decord", _read_decord), ("av", _read_av)):
        if backend not in ("auto", name):
            continue
        try:
            frames, idx, n, fps, short = reader(path, sampling)
        except ImportError as err:  # an optional extra: falling back is expected, no warning
            errors.append(f"{name}: not installed ({err})")
            continue
        except ShortVideo:
            raise  # a property of the file, not of the decoder: the other backend would agree
        except Exception as err:  # decoders raise many types; the next backend gets a chance
            errors.append(f"{name}: {type(err).__name__}: {err}")
            decord_failed |= name == "decord"
            decoded_nothing = True
            continue
        if decord_failed and "decord" not in _warned:
            _warned.add("decord")  # once per process: a whole dataset may trip the same decord bug
            warnings.warn(f"decord could not read {path} ({errors[-1]}); using PyAV", stacklevel=2)
        clip = Clip(_resize(frames, sampling.size), idx, n, fps, short, name)
        if len(clip.frames) == 0:  # never hand out an empty clip (the datasets would pad it to zeros)
            raise OSError(f"cannot read video {path}: no frames decoded")
        if cache is not None:
            meta = np.array([clip.num_frames, clip.fps, float(clip.short)])
            cache.put(path, params, {"frames": clip.frames, "indices": clip.indices, "meta": meta})
        clip.decode_seconds = time.perf_counter() - t0
        return clip
    message = "; ".join(errors)
    if cache is not None and decoded_nothing:  # a real decode failure, not a missing decoder
        cache.put(path, params, {"error": np.array(message)})
    raise OSError(f"cannot read video {path}: {message}")
