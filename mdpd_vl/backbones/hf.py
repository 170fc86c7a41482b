"""transformers encoders as backbones: BERT / RoBERTa / MiniLM / CLIP text (`HFText`), CLIP vision / ViT
(`HFVision`). Layers are the encoder layer modules.

Weights come from `from_pretrained(name_or_folder)` (a hub name needs network; a local folder does not),
or the model is built with random init from a `config` (dict with `model_type`, or a `PretrainedConfig`).
Dual-encoder checkpoints (CLIP, SigLIP) are opened as their text or vision tower only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec, Precomputed
from mdpd_vl.errors import UserError

# dual-encoder model_type -> (text tower class, vision tower class) in transformers
_TOWERS = {
    "clip": ("CLIPTextModelWithProjection", "CLIPVisionModelWithProjection"),
    "siglip": ("SiglipTextModel", "SiglipVisionModel"),
}
_LAYER_PATHS = (
    "encoder.layer",
    "encoder.layers",
    "text_model.encoder.layers",
    "vision_model.encoder.layers",
    "transformer.layer",
    "layers",
)
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def hf_layer_modules(model: nn.Module) -> list[nn.Module]:
    """The encoder layer modules of a transformers model, shallow to deep."""
    for path in _LAYER_PATHS:
        obj: Any = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return list(obj)
    raise UserError(f"cannot find the encoder layers of {type(model).__name__}", field="backbone")


def make_config(config: Any) -> Any:
    """A `PretrainedConfig` from a config object or a dict carrying `model_type`."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError("must be a PretrainedConfig or a dict with 'model_type'", field="config")
    rest = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **rest)


def _looks_local(name: str) -> bool:
    """A path rather than a hub id (`org/model`): absolute, `./`, `../`, `~`, or existing here."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or os.path.exists(os.path.expanduser(name))


def check_source(name: str) -> None:
    """A local model folder must exist, be a folder and hold a readable `config.json`: checked before
    transformers is asked (which would try the hub for a missing folder and print a traceback)."""
    if not _looks_local(name):
        return
    path = Path(name).expanduser()
    if not path.is_dir():
        what = "model folder not found" if not path.exists() else "not a folder"
        raise UserError(f"{what}; pass a folder written by save_pretrained, or a hub name", where=name,
                        field="backbone")
    config = path / "config.json"
    try:
        with open(config, "rb") as fh:
            fh.read(1)
    except OSError as err:
        reason = "no config.json: not a transformers model folder" if isinstance(err, FileNotFoundError) \
            else f"cannot read config.json ({err.strerror or type(err).__name__})"
        raise UserError(reason, where=name, field="backbone") from None


def _load(what: str, name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` (a transformers `from_pretrained`), any failure one UserError line."""
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        hint = "" if _looks_local(name) else " (a hub name needs the network, or a local folder)"
        raise UserError(f"cannot load the {what}{hint}: {type(err).__name__}: {first}", where=name,
                        field="backbone") from None


def _build_model(
    name: str | None,
    config: Any,
    pretrained: bool,
    local_files_only: bool,
    tower: int,
    model_class: str | None,
) -> nn.Module:
    """Random init from `config`, else `from_pretrained(name)`; dual encoders give one tower."""
    import transformers

    if config is None and name is None:
        raise UserError("give a model name/folder or a config", field="backbone")
    cfg = make_config(config) if config is not None else None
    if cfg is None:
        check_source(name)
        cfg = _load("model config", name, transformers.AutoConfig.from_pretrained, name,
                    local_files_only=local_files_only)
    if model_class is None and cfg.model_type in _TOWERS:
        model_class = _TOWERS[cfg.model_type][tower]
    cls = getattr(transformers, model_class) if model_class else transformers.AutoModel
    if cfg.model_type in _TOWERS:
        # one tower of a dual encoder: its sub-config, plus the shared projection width
        sub = getattr(cfg, ("text_config", "vision_config")[tower])
        if hasattr(cfg, "projection_dim"):
            sub.projection_dim = cfg.projection_dim
        cfg = sub
    if pretrained and config is None:
        if cls is transformers.AutoModel:
            return _load("model weights", name, cls.from_pretrained, name, local_files_only=local_files_only)
        return _load("model weights", name, cls.from_pretrained, name, config=cfg, local_files_only=local_files_only)
    return transformers.AutoModel.from_config(cfg) if cls is transformers.AutoModel else cls(cfg)


def _config_json(model: nn.Module) -> dict[str, Any]:
    """The model config as plain JSON (rebuilds the same architecture)."""
    return json.loads(model.config.to_json_string(use_diff=False))


def _input_keys(model: nn.Module) -> tuple[str, ...]:
    """The text input names the model's forward accepts (CLIP text takes no token_type_ids)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return tuple(k for k in _TEXT_KEYS if k in params)


def masked_mean(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `B x N x D` tokens over the valid (mask=True) positions."""
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class HFText(Backbone):
    """A transformers text encoder; `output(x)` = projected / pooler output, or pooled tokens."""

    modality = "text"

    def __init__(
        self,
        name_or_folder: str | None = None,
        *,
        config: Any = None,
        tokenizer: Any = None,
        pooling: str = "auto",
        max_length: int | None = None,
        pretrained: bool = True,
        local_files_only: bool = False,
        model_class: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("auto", "pooler", "mean", "cls"):
            raise UserError(f"{pooling!r} is not one of auto, pooler, mean, cls", field="pooling")
        self.name, self.pooling, self.max_length = name_or_folder, pooling, max_length
        self.local_files_only = local_files_only
        if model is None:
            model = _build_model(name_or_folder, config, pretrained, local_files_only, 0, model_class)
        self.model = model
        self._tokenizer = tokenizer
        self._input_keys = _input_keys(model)
        self._setup()

    def _block_modules(self) -> list[nn.Module]:
        return hf_layer_modules(self.model)

    def _run(self, x: dict[str, Tensor]) -> Any:
        return self.model(**{k: x[k] for k in self._input_keys if k in x})

    def padding_mask(self, x: dict[str, Tensor]) -> Tensor:
        if isinstance(x, Precomputed):
            return x.mask
        if "attention_mask" in x:
            return x["attention_mask"].bool()
        return torch.ones_like(x["input_ids"], dtype=torch.bool)

    def output(self, x: dict[str, Tensor]) -> Tensor:
        """Sentence embedding: `text_embeds` / pooler output ('auto', 'pooler'), masked mean or CLS token."""
        out = self._run(x)
        if self.pooling == "auto" and getattr(out, "text_embeds", None) is not None:
            return out.text_embeds
        pooled = getattr(out, "pooler_output", None)
        if self.pooling in ("auto", "pooler") and pooled is not None:
            return pooled
        if self.pooling == "pooler":
            raise UserError(f"{type(self.model).__name__} has no pooler", field="pooling")
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        return masked_mean(out.last_hidden_state, self.padding_mask(x))

    def example_input(self, batch_size: int = 2) -> dict[str, Tensor]:
        cfg = self.model.config
        length = min(16, int(getattr(cfg, "max_position_embeddings", 16)))
        device = next(self.model.parameters()).device
        ids = torch.randint(1, int(cfg.vocab_size), (batch_size, length), device=device)
        mask = torch.ones_like(ids)
        mask[-1, length // 2 :] = 0  # one padded row, so masks are exercised while probing
        return {"input_ids": ids, "attention_mask": mask}

    @property
    def tokenizer(self) -> Any:
        """The tokenizer: the one passed in, else `AutoTokenizer.from_pretrained(name_or_folder)`."""
        if self._tokenizer is None or isinstance(self._tokenizer, str):
            from transformers import AutoTokenizer

            source = self._tokenizer or self.name
            if source is None:
                raise UserError(
                    "this text backbone was built from a config without a tokenizer", field="tokenizer"
                )
            self._tokenizer = _load("tokenizer", str(source), AutoTokenizer.from_pretrained, source,
                                    local_files_only=self.local_files_only)
        return self._tokenizer

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Pad to the longest text, truncate at `max_length` (default: the backbone's / tokenizer's)."""
        length = max_length or self.max_length
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def spec(self) -> dict[str, Any]:
        tok = self._tokenizer if isinstance(self._tokenizer, str) else None
        return {
            "kind": "hf_text",
            "name": self.name,
            "model_class": type(self.model).__name__,
            "config": _config_json(self.model),
            "tokenizer": tok,
            "pooling": self.pooling,
            "max_length": self.max_length,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HFText:
        """Rebuild the architecture (random init) from `spec()`."""
        return cls(
            spec.get("name"),
            config=spec["config"],
            tokenizer=spec.get("tokenizer"),
            pooling=spec.get("pooling", "auto"),
            max_length=spec.get("max_length"),
            pretrained=False,
            model_class=spec.get("model_class"),
        )


class HFVision(Backbone):
    """A transformers vision encoder (CLIP vision, ViT): tokens = class token + patch grid."""

    modality = "image"

    def __init__(
        self,
        name_or_folder: str | None = None,
        *,
        config: Any = None,
        pretrained: bool = True,
        local_files_only: bool = False,
        model_class: str | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.name, self.local_files_only = name_or_folder, local_files_only
        if model is None:
            model = _build_model(name_or_folder, config, pretrained, local_files_only, 1, model_class)
        self.model = model
        self._setup()

    def _block_modules(self) -> list[nn.Module]:
        return hf_layer_modules(self.model)

    def _run(self, x: Tensor) -> Any:
        return self.model(pixel_values=x)

    def output(self, x: Tensor) -> Tensor:
        """`image_embeds` when the model projects, else the pooler output, else the mean token."""
        out = self._run(x)
        for key in ("image_embeds", "pooler_output"):
            if getattr(out, key, None) is not None:
                return getattr(out, key)
        return out.last_hidden_state.mean(dim=1)

    def _image_size(self) -> tuple[int, int]:
        size = self.model.config.image_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def example_input(self, batch_size: int = 2) -> Tensor:
        h, w = self._image_size()
        channels = int(getattr(self.model.config, "num_channels", 3))
        param = next(self.model.parameters())
        return torch.randn(batch_size, channels, h, w, device=param.device, dtype=param.dtype)

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        # the patch grid is what the patch-embedding conv makes of the probe image
        conv = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        h, w = self._image_size()
        gh = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        gw = (w + 2 * conv.padding[1] - conv.kernel_size[1]) // conv.stride[1] + 1
        prefix = tokens.shape[1] - gh * gw
        if prefix < 0:
            raise ValueError(f"layer {index}: {tokens.shape[1]} tokens cannot hold a {gh}x{gw} grid")
        return LayerSpec(width=int(tokens.shape[-1]), grid=(gh, gw), prefix=prefix)

    def transform(self, train: bool) -> Any:
        """PIL -> tensor with the model's image processor settings (mean=std=0.5 for bare configs)."""
        from torchvision import transforms as T

        size, mean, std = self._image_size()[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        processor = self._processor()
        if processor is not None:
            mean = tuple(processor.image_mean)
            std = tuple(processor.image_std)
            crop = getattr(processor, "crop_size", None) or getattr(processor, "size", None) or {}
            size = int(crop.get("height", crop.get("shortest_edge", size)))
        steps = (
            [T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
        )
        return T.Compose([_ToRGB(), *steps, T.ToTensor(), T.Normalize(mean, std)])

    def _processor(self) -> Any:
        if self.name is None:
            return None
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(self.name, local_files_only=self.local_files_only)
        except OSError:  # a folder/name without processor files: fall back to the defaults
            return None

    def spec(self) -> dict[str, Any]:
        return {
            "kind": "hf_vision",
            "name": self.name,
            "model_class": type(self.model).__name__,
            "config": _config_json(self.model),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HFVision:
        """Rebuild the architecture (random init) from `spec()`."""
        return cls(
            spec.get("name"), config=spec["config"], pretrained=False, model_class=spec.get("model_class")
        )


class _ToRGB:
    """PIL image -> RGB (a class, not a lambda, so DataLoader workers can pickle the transform)."""

    def __call__(self, image: Any) -> Any:
        return image.convert("RGB")
