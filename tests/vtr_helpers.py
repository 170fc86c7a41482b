"""Tiny generated videos (PyAV mp4s), their canonical `video_text` index, and a stand-in tokenizer,
shared by the video-text retrieval tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mdpd_vl.data.shapes_render import write_mp4

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 30),
           "white": (240, 240, 240), "purple": (150, 40, 180)}
SIDE = 32


def moving_square(colour: tuple[int, int, int], n_frames: int, left_to_right: bool, side: int = SIDE) -> list[np.ndarray]:
    """`n_frames` frames of a coloured square sliding across a dark background."""
    frames = []
    for k in range(n_frames):
        img = np.full((side, side, 3), 20, np.uint8)
        x = int((side - 10) * (k / max(n_frames - 1, 1)))
        x = x if left_to_right else side - 10 - x
        img[11:21, x : x + 10] = colour
        frames.append(img)
    return frames


def write_videos(root: Path, n_frames: list[int] | None = None, captions_per_video: int = 2) -> Path:
    """One mp4 per colour (4 fps) under `root/videos` and `root/train.index.json` over them; video i
    has `n_frames[i]` frames and `captions_per_video` captions naming its colour. Returns the index."""
    names = list(COLOURS)
    n_frames = n_frames or [6] * len(names)
    items = []
    for i, frames in enumerate(n_frames):
        colour = names[i % len(names)]
        rel = f"videos/v{i}.mp4"
        (root / "videos").mkdir(parents=True, exist_ok=True)
        write_mp4(root / rel, moving_square(COLOURS[colour], frames, i % 2 == 0), fps=4)
        caps = [f"a {colour} square", f"the {colour} box moving"][:captions_per_video]
        caps += [f"{colour} thing number {k}" for k in range(captions_per_video - len(caps))]
        items.append({"video": rel, "video_id": f"v{i}", "captions": caps})
    return write_index(root / "train.index.json", items, root)


def write_index(path: Path, items: list[dict], media_root: Path, split: str = "train") -> Path:
    """A canonical `video_text` index file (what `mdpd_vl.data.prep` writes)."""
    data = {"format": "mdpd_vl.index", "version": 1, "dataset": "tiny_videos", "split": split,
            "kind": "video_text", "media_root": str(media_root), "items": items}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def tokenize(texts: list[str], vocab: int = 40) -> dict[str, torch.Tensor]:
    """A stand-in tokenizer for the tiny BERT: [CLS]=1, one id per word in 2..vocab-1, right padding."""
    ids = [[1] + [sum(map(ord, w)) % (vocab - 2) + 2 for w in t.lower().split()] for t in texts]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
    return {"input_ids": out, "attention_mask": (out != 0).long()}
