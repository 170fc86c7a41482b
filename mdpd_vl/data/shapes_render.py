"""The synthetic shapes world, part 2: pixels. Scenes become JPEG images and PyAV-written mp4s.

Shapes are drawn at `SUPERSAMPLE` x the target size and box-downsampled, which gives anti-aliased
edges without any randomness, so the same scene always yields the same bytes.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mdpd_vl.data.shapes_scenes import COLOURS, Background, Scene, Thing, VideoScene, mover_position

SUPERSAMPLE = 2
JPEG_QUALITY = 92
VIDEO_FPS = 4


def background_array(bg: Background, side: int) -> np.ndarray:
    """`side` x `side` x 3 uint8 background."""
    base = np.asarray(bg.base, np.float32)
    if bg.kind == "plain":
        arr = np.broadcast_to(base, (side, side, 3)).copy()
    elif bg.kind == "gradient":
        ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)
        if bg.direction == "horizontal":
            t = np.broadcast_to(ramp[None, :], (side, side))
        elif bg.direction == "vertical":
            t = np.broadcast_to(ramp[:, None], (side, side))
        else:
            t = (ramp[None, :] + ramp[:, None]) / 2
        arr = base * (1 - t[..., None]) + np.asarray(bg.other, np.float32) * t[..., None]
    else:
        noise = np.random.default_rng(bg.seed).standard_normal((side, side, 1), dtype=np.float32)
        arr = base + noise * bg.sigma
    return np.clip(arr, 0, 255).astype(np.uint8)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of `shape` centred at (cx, cy) with circumradius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r / math.sqrt(2) * 1.15  # a bit larger than inscribed so squares do not look small
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        # centred on its bounding box, not its centroid, so the box is symmetric about (cx, cy)
        return [(cx, cy - r * 0.9), (cx + r, cy + r * 0.9), (cx - r, cy + r * 0.9)]
    if shape == "star":
        pts = []
        for k in range(10):
            ang = -math.pi / 2 + k * math.pi / 5
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def shape_box(thing: Thing, cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    """Tight box `x0, y0, x1, y1` (pixels) of the drawn shape."""
    poly = shape_polygon(thing.shape, cx, cy, r)
    if poly is None:
        return (cx - r, cy - r, cx + r, cy + r)
    xs, ys = zip(*poly)
    return (min(xs), min(ys), max(xs), max(ys))


def _draw(rgb: ImageDraw.ImageDraw, alpha: ImageDraw.ImageDraw, thing: Thing, cx: float, cy: float,
          r: float) -> None:
    s = SUPERSAMPLE
    colour = COLOURS[thing.colour]
    poly = shape_polygon(thing.shape, cx * s, cy * s, r * s)
    for draw, fill in ((rgb, colour), (alpha, 255)):
        if poly is None:
            draw.ellipse([cx * s - r * s, cy * s - r * s, cx * s + r * s, cy * s + r * s], fill=fill)
        else:
            draw.polygon(poly, fill=fill)


def render_frame(bg: np.ndarray, items: list[tuple[Thing, float, float, float]]) -> Image.Image:
    """Draw `(thing, cx, cy, r)` items over a background array; returns an RGB image of its size.

    Shapes are drawn at SUPERSAMPLE x on black with a coverage mask, box-downsampled (premultiplied
    colour + alpha) and composited over the background: anti-aliased and cheap.
    """
    side, s = bg.shape[0], SUPERSAMPLE
    rgb, alpha = Image.new("RGB", (side * s, side * s)), Image.new("L", (side * s, side * s))
    d_rgb, d_alpha = ImageDraw.Draw(rgb), ImageDraw.Draw(alpha)
    for thing, cx, cy, r in items:
        _draw(d_rgb, d_alpha, thing, cx, cy, r)
    colour = np.asarray(rgb.reduce(s), np.float32)
    cover = np.asarray(alpha.reduce(s), np.float32)[..., None] / 255.0
    out = bg.astype(np.float32) * (1.0 - cover) + colour
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def render_scene(scene: Scene, side: int) -> Image.Image:
    """The image of a placed static scene."""
    items = [(p.thing, p.cx, p.cy, p.r) for p in scene.placed]
    return render_frame(background_array(scene.background, side), items)


def jpeg_bytes(img: Image.Image) -> bytes:
    """Encode as baseline JPEG with fixed settings (same image -> same bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False)
    return buf.getvalue()


def video_frames(scene: VideoScene) -> list[np.ndarray]:
    """All frames of a video scene as `H x W x 3` uint8 arrays."""
    bg = background_array(scene.background, scene.size)
    frames = []
    for f in range(scene.num_frames):
        items = []
        for m in scene.movers:
            cx, cy = mover_position(m, f, scene)
            items.append((m.thing, cx, cy, m.r))
        frames.append(np.asarray(render_frame(bg, items)))
    return frames


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """Write frames as an MPEG-4 (Part 2) mp4 with PyAV, atomically.

    Not H.264: libx264 output was seen to differ between processes for identical frames, while
    FFmpeg's own mpeg4 encoder is bit-reproducible, and the world promises identical files per seed.
    """
    import av

    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.mp4")
    with av.open(str(tmp), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.bit_rate = 1_000_000
        stream.codec_context.options = {"threads": "1"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.replace(path)
