"""A pre-trained MDETR's transformer as a Backbone: its encoder and decoder layers are the layers b_1..b_L.

This is UniPT's placement for grounding (Paranioar/UniPT `MDETR/models/transformer.py`): the side network runs
beside the encoder layers (memory tokens: image grid + text, `B x (N_img + L) x d`) and the decoder layers
(query tokens, `B x Q x d`), and the box / score heads read the side output instead of the decoder's. Here the
side networks of `mdpd_vl.side` and MDPD's DualPath read this backbone through the ordinary protocol:
- layers: every encoder layer, every decoder layer, then `decoder.norm` (its output is what MDETR's heads read,
  `hs[-1]`; the norm is a layer as timm's EfficientNet `bn2` is one), so `b_L` feeds the box / score head;
- the frozen image CNN and text encoder run inside `_run`; they are not layers, so `norm_parameters()` and
  `backbone_trainable` name only the transformer's norms (`full` still trains everything);
- input: `{"images": B x 3 x H x W, "text": {"input_ids", "attention_mask"}}`; `padding_mask(x)` is the
  memory's valid mask `B x (N_img + L)`, which the side networks apply to the encoder layers only (the
  decoder layers have Q tokens). If N_img + L happened to equal Q, one padding token is appended to the text so
  that a memory mask can never be mistaken for a query mask.

Checkpoints: `save_mdetr` / `load_mdetr` write and read this project's layout (a folder: `config.json` with the
backbone and head specs + `model.safetensors`); `load_mdetr` also reads an official ashkamath/mdetr `.pth`
(`checkpoint["model_ema"]` or `["model"]`; ResNet image backbones), mapping its keys (`official_keys`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec, Precomputed
from mdpd_vl.errors import UserError
from mdpd_vl.heads.grounding import BoxScoreHead, GroundingConfig, MdetrCore

FORMAT, VERSION = "mdpd_vl.mdetr", 1
CONFIG, WEIGHTS = "config.json", "model.safetensors"


class MdetrBackbone(Backbone):
    """Image CNN + text encoder + MDETR transformer (`MdetrCore`); layers = encoder, decoder, decoder norm."""

    modality = "image_text"

    def __init__(self, image: Backbone, text: Backbone, core: MdetrCore):
        super().__init__()
        if core.image_width != image.widths[-1] or core.text_width != text.widths[-1]:
            raise UserError(f"the transformer reads widths {core.image_width}/{core.text_width}, the backbones give "
                            f"{image.widths[-1]}/{text.widths[-1]}", field="backbone")
        self.image, self.text, self.core = image, text, core
        self._image_tokens: dict[tuple[int, int], int] = {}
        self._setup()

    # -- protocol -----------------------------------------------------------------------------
    def _block_modules(self) -> list[nn.Module]:
        assert self.core.decoder.norm is not None
        return [*self.core.encoder.layers, *self.core.decoder.layers, self.core.decoder.norm]

    def _run(self, x: dict[str, Any]) -> Tensor:
        images = x["images"]
        img = self.image.features(images)[-1]
        self._image_tokens[tuple(images.shape[-2:])] = img.shape[1]
        grid = self.image.layer_specs[-1].grid_for(img.shape[1])
        if grid is None:
            raise UserError("the image backbone's last layer has no grid", field="backbone")
        text = self._text(x["text"], img.shape[1])
        memory = self.core.encode(img, grid, self.text.features(text)[-1], self.text.padding_mask(text))
        return self.core.decode(memory)[-1]

    def padding_mask(self, x: Any) -> Tensor | None:
        if isinstance(x, Precomputed):
            return x.mask
        n_img = self.image_tokens(x["images"])
        text = self._text(x["text"], n_img)
        valid = self.text.padding_mask(text).bool()
        return torch.cat([valid.new_ones(valid.shape[0], n_img), valid], dim=1)

    def example_input(self, batch_size: int = 2) -> dict[str, Any]:
        return {"images": self.image.example_input(batch_size), "text": self.text.example_input(batch_size)}

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        return LayerSpec(width=int(tokens.shape[-1]))  # memory and queries have no fixed grid

    @property
    def num_encoder_layers(self) -> int:
        return len(self.core.encoder.layers)

    # -- helpers ------------------------------------------------------------------------------
    def image_tokens(self, images: Tensor) -> int:
        """Image tokens the CNN makes of `images` (probed once per input size, in eval mode, without grad)."""
        key = tuple(images.shape[-2:])
        if key not in self._image_tokens:
            modes = [(m, m.training) for m in self.image.modules()]  # per module: BatchNorm may be frozen alone
            self.image.eval()
            with torch.no_grad():
                self._image_tokens[key] = self.image.features(images[:1])[-1].shape[1]
            for module, mode in modes:
                module.training = mode
        return self._image_tokens[key]

    def _text(self, text: dict[str, Tensor], n_img: int) -> dict[str, Tensor]:
        if n_img + text["input_ids"].shape[1] != self.core.cfg.num_queries:
            return text
        out = dict(text)
        for key, value in text.items():  # one padding column: memory length != query count
            if isinstance(value, Tensor) and value.dim() == 2:
                out[key] = torch.cat([value, value.new_zeros(value.shape[0], 1)], dim=1)
        return out

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        return self.text.tokenize(texts, max_length)  # type: ignore[attr-defined]

    def transform(self, train: bool) -> Any:
        return self.image.transform(train)  # type: ignore[attr-defined]

    def spec(self) -> dict[str, Any]:
        return {"kind": "mdetr", "image": self.image.spec(), "text": self.text.spec(), "core": self.core.spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MdetrBackbone:
        """Rebuild the architecture (random init) from `spec()`."""
        from mdpd_vl.backbones import build_backbone

        return cls(build_backbone(spec["image"]), build_backbone(spec["text"]), MdetrCore.from_spec(spec["core"]))


class _Bundle(nn.Module):
    """image / text / core / head under the key prefixes of the saved layout."""

    def __init__(self, image: nn.Module, text: nn.Module, core: nn.Module, head: nn.Module):
        super().__init__()
        self.image, self.text, self.core, self.head = image, text, core, head


def save_mdetr(folder: str | Path, image: Backbone, text: Backbone, core: MdetrCore, head: BoxScoreHead,
               extra: dict[str, Any] | None = None) -> Path:
    """Write an MDETR (backbones + transformer + box / score head) that `load_mdetr` reads: `model.safetensors`
    then `config.json`, each atomically. LoRA must be merged first (the specs rebuild plain modules)."""
    from safetensors.torch import save_model

    from mdpd_vl.export import _atomic_write

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "version": VERSION, "image": image.spec(), "text": text.spec(),
              "core": core.spec(), "head": head.spec()["kwargs"], "extra": extra or {}}
    bundle = _Bundle(image, text, core, head)
    _atomic_write(out / WEIGHTS, lambda tmp: save_model(bundle, tmp, metadata={"format": FORMAT}))
    text_json = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(text_json, encoding="utf-8"))
    return out


def load_mdetr(path: str | Path, text_backbone: str | Backbone | None = None) -> tuple[MdetrBackbone, BoxScoreHead]:
    """A pre-trained MDETR: a folder written by `save_mdetr`, or an official MDETR `.pth` checkpoint. For the
    official file, `text_backbone` names the transformers text encoder to build (config + tokenizer; default: the
    checkpoint's `args.text_encoder_type`), or is a ready backbone of that architecture."""
    path = Path(path)
    if path.is_dir():
        return _load_ours(path)
    if not path.is_file():
        raise UserError("pre-trained MDETR not found (a folder written by this recipe or an MDETR .pth)",
                        where=str(path), field="pretrained")
    return _load_official(path, text_backbone)


def _load_ours(folder: Path) -> tuple[MdetrBackbone, BoxScoreHead]:
    from safetensors.torch import load_model

    from mdpd_vl.backbones import build_backbone

    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"no readable {CONFIG} ({err})", where=str(folder / CONFIG), field="pretrained") from None
    if config.get("format") != FORMAT:
        raise UserError(f"not an MDETR checkpoint (format {config.get('format')!r}, expected {FORMAT!r})",
                        where=str(folder / CONFIG), field="format")
    backbone = MdetrBackbone(build_backbone(config["image"]), build_backbone(config["text"]),
                             MdetrCore.from_spec(config["core"]))
    head = BoxScoreHead(**config["head"])
    bundle = _Bundle(backbone.image, backbone.text, backbone.core, head)
    try:
        load_model(bundle, str(folder / WEIGHTS), strict=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"weights do not fit the config ({str(err).splitlines()[0]})", where=str(folder / WEIGHTS),
                        field="state_dict") from None
    return backbone, head


# -- the official layout ---------------------------------------------------------------------------
# ashkamath/mdetr `MDETR` attribute -> ours; longest prefix first. `backbone` is a Joiner(backbone, pos
# encoding) whose `0.body` is torchvision's ResNet trunk (IntermediateLayerGetter up to layer4).
_PREFIXES = (
    ("backbone.0.body.", "image.model."),
    ("transformer.text_encoder.", "text.model."),
    ("transformer.resizer.", "core.resizer."),
    ("transformer.encoder.", "core.encoder."),
    ("transformer.decoder.", "core.decoder."),
    ("input_proj.", "core.input_proj."),
    ("query_embed.", "core.query_embed."),
    ("class_embed.", "head.class_embed."),
    ("bbox_embed.", "head.bbox_embed."),
)
# parts of an official model that the grounding model does not use (pre-training / QA / CLEVR heads)
_UNUSED = ("contrastive_align_projection_", "contrastive_projection_", "transformer.CLS.", "isfinal_embed.",
           "qa_embed.", "answer_")


def official_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename an official MDETR state dict to this layout: (mapped tensors, dropped keys). `input_proj` is a
    1x1 Conv2d there and a Linear here (the same map; the kernel is reshaped)."""
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        new = next((ours + key[len(theirs):] for theirs, ours in _PREFIXES if key.startswith(theirs)), None)
        if new is None or key.startswith(_UNUSED):
            dropped.append(key)
            continue
        if key == "input_proj.weight" and value.dim() == 4:
            value = value.flatten(1)
        mapped[new] = value
    return mapped, dropped


def _official_config(state: dict[str, Tensor], args: Any) -> GroundingConfig:
    """GroundingConfig from the checkpoint's `args` where present, else from the tensor shapes."""
    d = int(state["query_embed.weight"].shape[1])
    layers = {k.split(".")[3] for k in state if k.startswith("transformer.encoder.layers.")}
    dec = {k.split(".")[3] for k in state if k.startswith("transformer.decoder.layers.")}
    ff = int(state["transformer.encoder.layers.0.linear1.weight"].shape[0]) if layers else 2048

    def arg(name: str, default: Any) -> Any:
        return getattr(args, name, default) if args is not None else default

    if arg("pre_norm", False):
        raise UserError("pre-norm MDETR transformers are not supported (MDETR's own pre-norm decoder is unfinished)",
                        field="pretrained")
    return GroundingConfig(d_model=d, nheads=int(arg("nheads", 8)), enc_layers=len(layers), dec_layers=len(dec),
                           dim_feedforward=ff, dropout=float(arg("dropout", 0.1)),
                           num_queries=int(state["query_embed.weight"].shape[0]),
                           num_tokens=int(state["class_embed.weight"].shape[0]) - 1)


def _read_official(path: Path) -> tuple[dict[str, Tensor], Any]:
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # `args` is a plain Namespace
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input error
        raise UserError(f"not a readable MDETR checkpoint ({type(err).__name__}: {err})", where=str(path),
                        field="pretrained") from None
    # MDETR evaluates with --ema: its EMA weights when saved, else the raw ones
    state = (ckpt.get("model_ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "query_embed.weight" not in state:
        raise UserError("no MDETR state dict (expected checkpoint['model'] with query_embed.weight)",
                        where=str(path), field="model")
    return state, ckpt.get("args")


def _load_official(path: Path, text_backbone: str | Backbone | None) -> tuple[MdetrBackbone, BoxScoreHead]:
    from mdpd_vl.backbones.hf import HFText
    from mdpd_vl.backbones.timm import TimmCNN

    state, args = _read_official(path)
    name = str(getattr(args, "backbone", "resnet101"))
    if name.startswith("timm_") or name.endswith("-gn"):
        raise UserError(f"MDETR image backbone {name!r} is not supported; ResNet checkpoints are (resnet50, "
                        "resnet101)", where=str(path), field="args.backbone")
    cfg = _official_config(state, args)
    image = TimmCNN(name, pretrained=False)
    if isinstance(text_backbone, Backbone):
        text = text_backbone
    else:
        from transformers import AutoConfig

        source = text_backbone or str(getattr(args, "text_encoder_type", "roberta-base"))
        text = HFText(source, config=AutoConfig.from_pretrained(source), tokenizer=source, pretrained=False)
    core = MdetrCore(int(state["input_proj.weight"].shape[1]), int(state["transformer.resizer.fc.weight"].shape[1]),
                     cfg)
    backbone = MdetrBackbone(image, text, core)
    head = BoxScoreHead(cfg.d_model, cfg.num_tokens)
    mapped, _ = official_keys(state)
    bundle = _Bundle(image, text, core, head)
    own = bundle.state_dict()
    mapped = {k: v for k, v in mapped.items() if k in own or not k.endswith("position_ids")}
    missing, unexpected = bundle.load_state_dict(mapped, strict=False)
    # the ResNet classifier is not part of MDETR; FrozenBatchNorm2d keeps no batch counter
    missing = [k for k in missing if not (k.startswith("image.model.fc.") or k.endswith("num_batches_tracked"))]
    if missing or unexpected:
        raise UserError(f"the checkpoint does not fit MDETR-{name}: missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}", where=str(path), field="model")
    return backbone, head
