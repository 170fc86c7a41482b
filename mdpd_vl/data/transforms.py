"""Image transforms: the backbone's own preprocessing first, a CLIP-style builder as the fallback.

Taking the transform from the backbone (`backbone.transform(train)`, which open_clip and timm
derive from the weights' config) keeps training, evaluation and serving on one preprocessing.
The fallback never flips or colour-jitters: captions here name left/right and colours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[[Image.Image], torch.Tensor]


def _to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def clip_transform(size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, *,
                   train: bool = False, scale: tuple[float, float] = (0.9, 1.0)) -> Transform:
    """CLIP preprocessing: bicubic resize of the shorter side, centre crop, RGB, tensor, normalise.
    With `train`, a random resized crop over `scale` of the area instead of the centre crop."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    if train:
        geometry = [T.RandomResizedCrop(size, scale=scale, interpolation=bicubic)]
    else:
        geometry = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose([*geometry, _to_rgb, T.ToTensor(), T.Normalize(mean, std)])


def box_transform(size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Transform:
    """Resize to `size` x `size` without cropping, so that normalised boxes stay valid (grounding)."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), _to_rgb,
                      T.ToTensor(), T.Normalize(mean, std)])


def image_transform(backbone: Any = None, train: bool = False, **fallback: Any) -> Transform:
    """`backbone.transform(train)` when the backbone has one, else `clip_transform(train=train, **fallback)`."""
    if backbone is not None and callable(getattr(backbone, "transform", None)):
        return backbone.transform(train)
    return clip_transform(train=train, **fallback)


def transform_stats(transform: Any) -> dict[str, Any] | None:
    """`{"size", "mean", "std"}` read from a torchvision Compose (None if it has no Normalize), so that a
    box-safe transform can reuse a backbone's resolution and normalisation."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", [transform])
    out: dict[str, Any] = {}
    for t in steps:
        if isinstance(t, T.Normalize):
            out["mean"], out["std"] = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        elif isinstance(t, (T.CenterCrop, T.RandomResizedCrop)):
            size = t.size
            out["size"] = int(size[0] if isinstance(size, (tuple, list)) else size)
        elif isinstance(t, T.Resize) and "size" not in out:
            size = t.size
            out["size"] = int(size[0] if isinstance(size, (tuple, list)) else size)
    return out if "mean" in out and "size" in out else None


def frames_to_tensor(frames: np.ndarray, transform: Transform) -> torch.Tensor:
    """`T x H x W x 3` uint8 frames -> `T x 3 x H' x W'` through the image transform, frame by frame."""
    return torch.stack([transform(Image.fromarray(f)) for f in frames])
