"""Referring-expression grounding as deployed: `ground(images, expressions) -> boxes in pixels`.

Two layouts of the served MDETR, one per placement of the side network during training:
- `TowerGrounder` (placement A): image backbone -> tokens, text backbone -> tokens, then the MDETR transformer
  (`heads.grounding.GroundingTransformer`: encoder over both, decoder with learned queries, box / score head);
- `PackedGrounder` (placement B): one pre-trained MDETR as a backbone (`backbones.mdetr.MdetrBackbone`) + its
  box / score head, whose packed output is unpacked.
`ReferringGrounder` wraps either with the preprocessing of the evaluation that produced the run's metrics (image
side and normalisation, resized without cropping as the datasets resize; the text backbone's tokenizer, maximum
length and special tokens), so `ground(files or PIL images, expressions)` returns the top-scoring box per
expression in the pixels of its own image, exactly as the recipe scored it. The grounding recipe evaluates its
deployed model through this class and the export stores the same settings. Nothing here imports side-network,
distillation or tuning code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from mdpd_vl.errors import UserError
from mdpd_vl.heads.grounding import (
    BoxScoreHead,
    GroundingConfig,
    GroundingOutput,
    GroundingTransformer,
    top_box,
)

ImageLike = Image.Image | str | Path
TRANSFORMER_FORMAT = "mdpd_vl.grounding_transformer"


class Grounder(nn.Module):
    """A grounding model as served: `forward(images, text) -> GroundingOutput`, `ground(...)` -> pixel boxes."""

    @torch.no_grad()
    def ground(self, images: Any, text: Any, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Top-scoring box per expression in pixels (`xyxy`) and its score; `sizes` is `B x 2` (height, width).
        Leaves the modules in eval mode: they may be shared with a training model, whose own `train()` (which
        keeps frozen backbones in eval mode; the engine calls it after evaluating) must be the one to undo it."""
        self.eval()
        out = self(images, text)
        return top_box(out, sizes.to(out.boxes.device))

    @torch.no_grad()
    def ground_all(self, images: Any, text: Any, sizes: Tensor) -> tuple[Tensor, Tensor]:
        """Every query's box in pixels (`B x Q x 4` `xyxy`) and score (`B x Q`): MDETR's P@k ranks them."""
        from torchvision.ops import box_convert

        self.eval()
        out = self(images, text)
        h, w = sizes.to(out.boxes).unbind(-1)
        scale = torch.stack([w, h, w, h], dim=-1).unsqueeze(1)
        return box_convert(out.boxes, "cxcywh", "xyxy") * scale, out.scores()


def image_grid(backbone: Any, tokens: Tensor) -> tuple[int, int]:
    """The spatial grid of the image tower's output tokens (the last layer's layout)."""
    grid = backbone.layer_specs[-1].grid_for(tokens.shape[1])
    if grid is None:
        raise UserError(f"the image backbone {type(backbone).__name__} has no spatial grid in its last layer",
                        field="backbone")
    return grid


class TowerGrounder(Grounder):
    """Placement A: image module -> tokens, text module -> tokens, then the MDETR transformer. `backbones` give
    the token grid and the text padding (the modules may be side-kept networks that are not backbones)."""

    def __init__(self, image: nn.Module, text: nn.Module, backbones: tuple[Any, Any],
                 transformer: GroundingTransformer):
        super().__init__()
        self.image, self.text, self.transformer = image, text, transformer
        self._backbones = backbones  # not registered again: they live inside image / text

    def forward(self, images: Any, text: Any) -> GroundingOutput:
        img, txt = self.image(images), self.text(text)
        grid = image_grid(self._backbones[0], img)
        return self.transformer(img, grid, txt, self._backbones[1].padding_mask(text))


class PackedGrounder(Grounder):
    """Placement B: the MDETR (+ side network when kept) and its box / score head, whose packed output is
    unpacked. The input is MDETR's `{"images", "text"}`; `forward(images, text)` builds it."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images: Any, text: Any = None) -> GroundingOutput:
        x = images if text is None else {"images": images, "text": text}
        return BoxScoreHead.unpack(self.module(x))


class ReferringGrounder(nn.Module):
    """A served grounding model + its preprocessing; `ground(images, expressions)` -> `N x 4` pixel boxes.

    `preprocess`: `{"image": {"size", "mean", "std"}, "text": {"max_length", "special_ids"}, "batch_size"}`;
    one image per expression (the same file may repeat)."""

    task = "vg"

    def __init__(self, model: Grounder, preprocess: dict[str, Any], image_backbone: Any, text_backbone: Any):
        super().__init__()
        self.model, self.preprocess = model, preprocess
        self._image_backbone, self._text_backbone = image_backbone, text_backbone
        self._transform: Any = None

    @property
    def image_transform(self) -> Any:
        """The evaluation's PIL -> tensor transform (resize to size x size, no crop, normalise)."""
        if self._transform is None:
            from mdpd_vl.data.transforms import GroundingTransform

            p = self.preprocess["image"]
            self._transform = GroundingTransform(int(p["size"]), tuple(p["mean"]), tuple(p["std"])).image
        return self._transform

    def tokenize(self, expressions: Sequence[str]) -> dict[str, Tensor]:
        return self._text_backbone.tokenize(list(expressions), max_length=self.preprocess["text"]["max_length"])

    def pixels(self, images: Sequence[ImageLike]) -> tuple[Tensor, Tensor]:
        """(`B x 3 x S x S` pixels, `B x 2` original (height, width)) of PIL images or image files."""
        from mdpd_vl.data.datasets import read_image
        from mdpd_vl.deploy.retrieval import pixels

        loaded = [img if isinstance(img, Image.Image) else read_image(Path(img)) for img in images]
        return pixels(loaded, self.image_transform), torch.tensor([[img.height, img.width] for img in loaded])

    def batches(self, images: Sequence[ImageLike], expressions: Sequence[str], batch_size: int | None = None
                ) -> Iterator[tuple[Tensor, dict[str, Tensor], Tensor]]:
        """(pixels, tokens, sizes) per batch, in order: what `ground` runs."""
        if len(images) != len(expressions):
            raise UserError(f"{len(images)} images for {len(expressions)} expressions: give one image per "
                            "expression", field="images")
        bs = int(batch_size or self.preprocess.get("batch_size") or 32)
        for i in range(0, len(images), bs):
            pixels, sizes = self.pixels(images[i:i + bs])
            yield pixels, self.tokenize(expressions[i:i + bs]), sizes

    @torch.no_grad()
    def ground_with_scores(self, images: Sequence[ImageLike], expressions: Sequence[str],
                           batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(`N x 4` pixel `xyxy` boxes, `N` scores), float32 on the CPU."""
        device = next(self.model.parameters()).device
        boxes, scores = [], []
        for pixels, text, sizes in self.batches(images, expressions, batch_size):
            b, s = self.model.ground(pixels.to(device), {k: v.to(device) for k, v in text.items()}, sizes)
            boxes.append(b.float().cpu())
            scores.append(s.float().cpu())
        if not boxes:
            raise UserError("nothing to ground", field="expressions")
        return torch.cat(boxes), torch.cat(scores)

    def ground(self, images: Sequence[ImageLike], expressions: Sequence[str], batch_size: int | None = None) -> Tensor:
        """The top-scoring box of each expression in the pixels of its image (`xyxy`, `N x 4`)."""
        return self.ground_with_scores(images, expressions, batch_size)[0]

    # -- export ---------------------------------------------------------------------------------
    def exportable(self) -> bool:
        """Every part is a plain backbone + head (faded MDPD, merged LoRA, head-only methods)."""
        from mdpd_vl.export import is_plain

        m = self.model
        if isinstance(m, TowerGrounder):
            return is_plain(m.image) and is_plain(m.text)
        return isinstance(m, PackedGrounder) and is_plain(m.module)

    def export_parts(self, folder: Path) -> dict[str, Any]:
        """Write the parts (placement A: `image/`, `text/`, `transformer/`; B: `mdetr/`); what config.json records."""
        from mdpd_vl.export import export_faded

        if not self.exportable():
            raise TypeError("only plain backbone + head parts are exported (see exportable())")
        m = self.model
        extra = {"task": self.task}
        if isinstance(m, PackedGrounder):
            export_faded(m.module, folder / "mdetr", extra_config=extra)  # type: ignore[arg-type]
            return {"parts": {"mdetr": "mdetr"}, "layout": "packed", "preprocess": self.preprocess}
        assert isinstance(m, TowerGrounder)
        export_faded(m.image, folder / "image", extra_config={**extra, "tower": "image"})  # type: ignore[arg-type]
        export_faded(m.text, folder / "text", extra_config={**extra, "tower": "text"})  # type: ignore[arg-type]
        save_transformer(m.transformer, folder / "transformer")
        return {"parts": {"image": "image", "text": "text", "transformer": "transformer"}, "layout": "towers",
                "preprocess": self.preprocess}

    @classmethod
    def from_export(cls, folder: Path, config: dict[str, Any]) -> ReferringGrounder:
        """Rebuild from an export folder (see `export_parts`)."""
        from mdpd_vl.export import load_faded

        parts = config["parts"]
        if config.get("layout") == "packed":
            module = load_faded(folder / parts["mdetr"])
            bb = module.backbone
            return cls(PackedGrounder(module), config["preprocess"], bb, bb).eval()
        image, text = load_faded(folder / parts["image"]), load_faded(folder / parts["text"])
        transformer = load_transformer(folder / parts["transformer"])
        grounder = TowerGrounder(image, text, (image.backbone, text.backbone), transformer)
        return cls(grounder, config["preprocess"], image.backbone, text.backbone).eval()


def save_transformer(transformer: GroundingTransformer, folder: Path) -> Path:
    """`model.safetensors` then `config.json` (its spec), each atomically."""
    from safetensors.torch import save_model

    from mdpd_vl.atomic import tensor_bytes, write_with

    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"format": TRANSFORMER_FORMAT, "version": 1, **transformer.spec()}, indent=2, sort_keys=True)
    write_with(folder / "model.safetensors", lambda tmp: save_model(transformer, tmp), tensor_bytes(transformer))
    write_with(folder / "config.json", lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return folder


def load_transformer(folder: Path) -> GroundingTransformer:
    """The transformer `save_transformer` wrote, loaded strictly, in eval mode."""
    from safetensors.torch import load_model

    path = folder / "config.json"
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"no readable grounding transformer config ({err})", where=str(path)) from None
    if not isinstance(spec, dict) or spec.get("format") != TRANSFORMER_FORMAT:
        raise UserError(f"format is not {TRANSFORMER_FORMAT!r}", where=str(path), field="format")
    kw = spec.get("kwargs", {})
    model = GroundingTransformer(int(kw["image_width"]), int(kw["text_width"]), GroundingConfig.from_dict(spec["cfg"]))
    load_model(model, str(folder / "model.safetensors"), strict=True)
    return model.eval()
