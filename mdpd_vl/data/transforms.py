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


class GroundingTransform:
    """Image + box (+ sentence) transform for grounding: resize to `size` x `size` without cropping, so the box,
    normalised (cx, cy, w, h) by the image, stays true; RGB, tensor, normalise.

    With `train` and `crop_prob` > 0, MDETR's box-respecting crop first (ashkamath/mdetr datasets/transforms.py
    `RandomSizeCrop(respect_boxes=True)`): a random region of `min_crop`..1 of each side that contains the whole
    box; the box is re-normalised to it. MDETR flips no referring-expression image (`cautious`), nor does this.
    Randomness comes from torch's generator, which the training loop seeds per sample."""

    carries_boxes = True

    def __init__(self, size: int = 224, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 *, train: bool = False, crop_prob: float = 0.0, min_crop: float = 0.6):
        from torchvision import transforms as T

        if not 0.0 <= crop_prob <= 1.0 or not 0.0 < min_crop <= 1.0:
            raise ValueError("crop_prob must lie in [0, 1] and min_crop in (0, 1]")
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)
        self.train, self.crop_prob, self.min_crop = train, crop_prob, min_crop
        self.image = T.Compose([T.Resize((self.size, self.size), interpolation=T.InterpolationMode.BICUBIC),
                                _to_rgb, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def __call__(self, img: Image.Image, box: torch.Tensor, sentence: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        if self.train and self.crop_prob > 0 and float(torch.rand(())) < self.crop_prob:
            img, box = self._crop(img, box)
        return self.image(img), box, sentence

    def _crop(self, img: Image.Image, box: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
        from torchvision.ops import box_convert

        w, h = img.size
        x1, y1, x2, y2 = (box_convert(box[None], "cxcywh", "xyxy")[0] * torch.tensor([w, h, w, h])).tolist()
        frac = self.min_crop + (1.0 - self.min_crop) * torch.rand(2)
        cw, ch = max(x2 - x1, frac[0].item() * w), max(y2 - y1, frac[1].item() * h)
        lo_x, hi_x = max(0.0, x2 - cw), min(x1, w - cw)
        lo_y, hi_y = max(0.0, y2 - ch), min(y1, h - ch)
        if hi_x < lo_x or hi_y < lo_y:
            return img, box  # no region of this size holds the box: keep the image whole
        u = torch.rand(2)
        cx0, cy0 = lo_x + (hi_x - lo_x) * u[0].item(), lo_y + (hi_y - lo_y) * u[1].item()
        region = (round(cx0), round(cy0), round(cx0 + cw), round(cy0 + ch))
        cropped = img.crop(region)
        rw, rh = region[2] - region[0], region[3] - region[1]
        new = torch.tensor([x1 - region[0], y1 - region[1], x2 - region[0], y2 - region[1]])
        new = new.clamp(min=0) / torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
        return cropped, box_convert(new.clamp(max=1)[None], "xyxy", "cxcywh")[0].to(box.dtype)


def grounding_transform(backbone: Any = None, size: int | None = None, train: bool = False,
                        **kw: Any) -> GroundingTransform:
    """A GroundingTransform with the backbone's own resolution and normalisation (read from its eval
    transform), `size` overriding the resolution; ImageNet statistics at 224 px without a backbone."""
    stats = transform_stats(backbone.transform(False)) if callable(getattr(backbone, "transform", None)) else None
    stats = stats or {"size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return GroundingTransform(size or stats["size"], stats["mean"], stats["std"], train=train, **kw)


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
