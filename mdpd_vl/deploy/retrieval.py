"""Image-text retrieval as deployed: both towers, with the preprocessing they were evaluated with.

`ImageTextRetriever` holds the image encoder and the text encoder (each a backbone + its VSE head;
for MDPD the faded ones) and the preprocessing of the evaluation that produced the run's metrics:
image side and normalisation (or the backbone's own transform), the text backbone's tokenizer and
its maximum length, and the batch size. `encode_images` / `encode_texts` return L2-normalised
embeddings, so `encode_images(a) @ encode_texts(b).T` are the cosine similarities the metrics
were computed from. The ITR recipe evaluates its deployed model through this very class, and the
export stores the same settings, so a reloaded export reproduces the metrics exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

ImageLike = Image.Image | str | Path


def image_preprocess(size: int | None, backbone: Any) -> dict[str, Any]:
    """The image preprocessing record of an evaluation at `size` pixels (None: the backbone's own).

    At a given size it is CLIP's (bicubic resize of the shorter side, centre crop, normalise) with
    the backbone's own mean and std, exactly what `clip_transform(size, mean, std)` builds."""
    if size is None:
        return {"kind": "backbone"}
    from mdpd_vl.data.transforms import transform_stats

    stats = transform_stats(backbone.transform(False)) or {}
    out: dict[str, Any] = {"kind": "clip", "size": int(size)}
    out.update({k: [float(v) for v in stats[k]] for k in ("mean", "std") if k in stats})
    return out


def build_image_transform(record: dict[str, Any], backbone: Any) -> Any:
    """PIL -> tensor from an `image_preprocess` record."""
    if record.get("kind") == "backbone":
        return backbone.transform(False)
    if record.get("kind") != "clip":
        raise ValueError(f"unknown image preprocessing {record!r}")
    from mdpd_vl.data.transforms import clip_transform

    kw = {k: tuple(record[k]) for k in ("mean", "std") if k in record}
    return clip_transform(int(record["size"]), **kw)


class ImageTextRetriever(nn.Module):
    """Two encoders + preprocessing; `encode_images`, `encode_texts`, `similarity`.

    `preprocess`: `{"image": image_preprocess(...), "text": {"max_length": int}, "batch_size": int}`.
    The backbones (for the image transform and the tokenizer) default to `image.backbone` and
    `text.backbone`, which every plain backbone + head model has."""

    task = "itr"

    def __init__(self, image: nn.Module, text: nn.Module, preprocess: dict[str, Any],
                 image_backbone: Any = None, text_backbone: Any = None):
        super().__init__()
        self.image, self.text, self.preprocess = image, text, preprocess
        self._image_backbone = image_backbone if image_backbone is not None else image.backbone
        self._text_backbone = text_backbone if text_backbone is not None else text.backbone
        self._transform: Any = None

    @property
    def image_backbone(self) -> Any:
        return self._image_backbone

    @property
    def text_backbone(self) -> Any:
        return self._text_backbone

    @property
    def image_transform(self) -> Any:
        """The evaluation's PIL -> tensor transform."""
        if self._transform is None:
            self._transform = build_image_transform(self.preprocess["image"], self._image_backbone)
        return self._transform

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Token ids + attention mask with the evaluation's tokenizer and maximum length."""
        return self._text_backbone.tokenize(list(texts), max_length=self.preprocess["text"]["max_length"])

    def _batch_size(self, given: int | None) -> int:
        return int(given or self.preprocess.get("batch_size") or 64)

    def pixels(self, images: Sequence[ImageLike]) -> Tensor:
        """`B x 3 x H x W` from PIL images or image files, decoded as the datasets decode them."""
        return pixels(images, self.image_transform)

    def image_inputs(self, images: Sequence[ImageLike], batch_size: int | None = None) -> Iterator[Tensor]:
        """The image encoder's input batches (pixels), in order: what `encode_images` runs."""
        bs, items = self._batch_size(batch_size), list(images)
        return (self.pixels(items[i:i + bs]) for i in range(0, len(items), bs))

    def text_inputs(self, texts: Sequence[str], batch_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """The text encoder's input batches (token ids + mask), in order: what `encode_texts` runs."""
        bs, items = self._batch_size(batch_size), list(texts)
        return (self.tokenize(items[i:i + bs]) for i in range(0, len(items), bs))

    def encode_images(self, images: Sequence[ImageLike] | Tensor, batch_size: int | None = None) -> Tensor:
        """L2-normalised image embeddings (`N x D`, float32, CPU) of PIL images, paths, or a pixel batch."""
        if isinstance(images, Tensor):
            return encode_batches(self.image, [images])
        return encode_batches(self.image, self.image_inputs(images, batch_size))

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> Tensor:
        """L2-normalised caption embeddings (`N x D`, float32, CPU)."""
        return encode_batches(self.text, self.text_inputs(texts, batch_size))

    def similarity(self, images: Sequence[ImageLike], texts: Sequence[str]) -> Tensor:
        """Cosine similarities, images x texts."""
        return self.encode_images(images) @ self.encode_texts(texts).t()

    # -- export ---------------------------------------------------------------------------------
    def exportable(self) -> bool:
        """Both encoders are a plain backbone + head (faded MDPD, merged LoRA, head-only methods)."""
        from mdpd_vl.export import is_plain

        return is_plain(self.image) and is_plain(self.text)

    def export_parts(self, folder: Path) -> dict[str, Any]:
        """Write `image/` and `text/` (plain backbone + head each); return what config.json records."""
        from mdpd_vl.export import export_faded

        if not self.exportable():
            raise TypeError("only plain backbone + head encoders are exported (see exportable())")
        for name, module in (("image", self.image), ("text", self.text)):
            export_faded(module, folder / name, extra_config={"task": self.task, "tower": name})
        return {"parts": {"image": "image", "text": "text"}, "preprocess": self.preprocess}

    @classmethod
    def from_export(cls, folder: Path, config: dict[str, Any]) -> ImageTextRetriever:
        """Rebuild from an export folder (see `export_parts`)."""
        from mdpd_vl.export import load_faded

        parts = config["parts"]
        return cls(load_faded(folder / parts["image"]), load_faded(folder / parts["text"]), config["preprocess"]).eval()


def pixels(images: Sequence[ImageLike], transform: Any) -> Tensor:
    """`B x 3 x H x W` from PIL images or image files (decoded as the datasets decode them, RGB) through
    `transform`: the one image path of every deployed task model."""
    from mdpd_vl.data.datasets import read_image

    loaded = [img if isinstance(img, Image.Image) else read_image(Path(img)) for img in images]
    return torch.stack([transform(img if img.mode == "RGB" else img.convert("RGB")) for img in loaded])


@torch.no_grad()
def encode_batches(module: nn.Module, batches: Iterable[Any]) -> Tensor:
    """L2-normalised outputs of `module` (eval mode, no grad) over `batches`, concatenated on the CPU."""
    device = next(module.parameters()).device
    was = module.training
    module.eval()
    try:
        outs = [F.normalize(module(_to(b, device)).float(), dim=-1).cpu() for b in batches]
    finally:
        module.train(was)
    if not outs:
        raise ValueError("nothing to encode")
    return torch.cat(outs)


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):  # token ids + mask; a video batch (frames or their features + frame mask)
        return {k: _to(v, device) for k, v in x.items()}
    return x  # precomputed features (the recipe's frozen-backbone evaluation) stay where they are
