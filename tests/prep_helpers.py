"""Helpers for the data_prep tests: tiny media files, the real fixtures, running a script in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Small real annotation files from public repositories, unchanged (provenance: tests/fixtures/real/README.md).
REAL = ROOT / "tests" / "fixtures" / "real"


def jpeg(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24)) -> Path:
    """Write a tiny JPEG (width x height = `size`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def video(path: Path, frames: int = 4, fmt: str | None = None) -> Path:
    """Write a tiny 32x32 video with `frames` frames with PyAV (mp4/avi: mpeg4, webm: vp8)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libvpx" if path.suffix == ".webm" else "mpeg4"
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def garbage(path: Path, data: bytes = b"this is not media " * 20) -> Path:
    """Write a file that does not decode as any image or video."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its bytes, as an interrupted download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def real_head(name: str, dest: Path, lines: int) -> list[str]:
    """Copy the first `lines` lines of a real fixture (header included), bytes unchanged; return them."""
    data = (REAL / name).read_bytes()
    head = b"".join(data.splitlines(keepends=True)[:lines])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(head)
    return head.decode().splitlines()


def real_tail(name: str, dest: Path, lines: int) -> list[str]:
    """Copy the last `lines` lines of a real fixture, bytes unchanged (a missing final newline stays)."""
    data = (REAL / name).read_bytes()
    tail = b"".join(data.splitlines(keepends=True)[-lines:])
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(tail)
    return tail.decode().splitlines()


def load_index(out: Path, split: str) -> dict[str, Any]:
    """Read `<out>/<split>.index.json`."""
    return json.loads((out / f"{split}.index.json").read_text(encoding="utf-8"))


def written(out: Path) -> list[str]:
    """Names of the files in `out` (empty when it does not exist)."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def run_script(name: str, argv: list[str]) -> int:
    """Run `data_prep/<name>.py`'s main in this process; the exit status (SystemExit included)."""
    spec = importlib.util.spec_from_file_location(f"data_prep_{name}", ROOT / "data_prep" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return int(module.main(argv) or 0)
    except SystemExit as exc:
        return int(exc.code or 0)
