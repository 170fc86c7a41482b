"""open_clip image towers (ViT, ModifiedResNet, timm trunks) and text towers as backbones.

Models are built by name with `open_clip.create_model_and_transforms` (always as `CustomTextCLIP`,
`force_custom_text=True`, so the text tower is one module, `model.text`; open_clip converts the
classic checkpoint layout on load). `pretrained` is an open_clip tag (downloads) or a local file;
`model_kwargs` override the named config (e.g. a tiny `vision_cfg` / `text_cfg` for tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec, Precomputed
from mdpd_vl.backbones.timm import MapGridMixin, timm_layer_modules, token_grid
from mdpd_vl.errors import UserError


def _load_failure(name: str, path: str, field: str, err: Exception) -> UserError:
    """One line for a local weights file that does not load (cut, corrupt, foreign, unreadable)."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    if "weights only load failed" in first.lower():  # torch's advice (weights_only=False) is not ours
        first = "not a plain weights file (cut, corrupt, or it pickles more than tensors)"
    return UserError(f"cannot load these weights into {name}: {type(err).__name__}: {first}", where=path,
                     field=field)


def create_clip(
    name: str, pretrained: str | None = None, checkpoint: str | None = None, **model_kwargs: Any
) -> nn.Module:
    """One open_clip model (both towers): config `name` + `model_kwargs`, weights from tag or files."""
    import os

    import open_clip

    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model {name!r} (see `python -m mdpd_vl.backbones --list`)",
            field="backbone",
        )
    local = bool(pretrained) and (os.path.exists(pretrained) or pretrained.startswith(("/", "./", "../", "~"))
                                  or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")))
    if local and not os.path.isfile(pretrained):  # type: ignore[arg-type]
        what = "weights file not found" if not os.path.exists(pretrained) else "not a file"  # type: ignore[arg-type]
        raise UserError(f"{what}; pass an open_clip checkpoint file or a pretrained tag", where=pretrained,
                        field="pretrained")
    if pretrained and not local:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(
                f"{pretrained!r} is neither a local file nor a pretrained tag of {name}; tags: {tags}",
                field="pretrained",
            )
    try:
        model, _, _ = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            force_custom_text=True,
            pretrained_text=False,  # never fetch a separate HF text tower behind the user's back
            **model_kwargs,
        )
    except Exception as err:  # a local file's failures (torch, safetensors, OS) are one line
        if local:
            raise _load_failure(name, pretrained, "pretrained", err) from None  # type: ignore[arg-type]
        if not isinstance(err, RuntimeError):
            raise
        if pretrained and "download" in str(err).lower():
            raise UserError(
                f"could not fetch {name}/{pretrained} (needs network; or pass a local file): {err}",
                field="pretrained",
            ) from None
        raise
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise UserError("file not found", where=checkpoint, field="checkpoint")
        try:
            open_clip.load_checkpoint(model, checkpoint, weights_only=True)
        except Exception as err:  # a cut, foreign or unreadable file: one line
            raise _load_failure(name, checkpoint, "checkpoint", err) from None
    return model


def open_clip_pair(
    name: str, pretrained: str | None = None, checkpoint: str | None = None, **model_kwargs: Any
) -> tuple[OpenClipImage, OpenClipText]:
    """Image and text towers of one open_clip model, built with a single `create_model` call."""
    clip = create_clip(name, pretrained, checkpoint, **model_kwargs)
    image = OpenClipImage(name, clip=clip, **model_kwargs)
    text = OpenClipText(name, clip=clip, **model_kwargs)
    return image, text


def _batch_major(out: Tensor, batch: int, batch_first: bool | None) -> Tensor:
    """open_clip runs its transformer as NLD or LND depending on version/config: return NLD."""
    if batch_first is None:  # no flag on the module: decide from the shape
        batch_first = out.shape[0] == batch or out.shape[1] != batch
    return out if batch_first else out.transpose(0, 1)


class OpenClipImage(MapGridMixin, Backbone):
    """open_clip image tower; layers = ViT resblocks, ModifiedResNet layer1..4 or timm trunk stages."""

    modality = "image"

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        *,
        clip: nn.Module | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if clip is None:
            clip = create_clip(name, pretrained, checkpoint, **model_kwargs)
        self.name, self.model_kwargs = name, dict(model_kwargs)
        self.model = clip.visual
        self._map_grids, self._batch = {}, 0
        self._setup()

    def _block_modules(self) -> list[nn.Module]:
        visual = self.model
        transformer = getattr(visual, "transformer", None)
        if transformer is not None and hasattr(transformer, "resblocks"):
            return list(transformer.resblocks)
        if all(hasattr(visual, f"layer{i}") for i in range(1, 5)):  # ModifiedResNet
            return [getattr(visual, f"layer{i}") for i in range(1, 5)]
        if hasattr(visual, "trunk"):  # TimmModel
            return timm_layer_modules(visual.trunk)
        raise UserError(f"unsupported open_clip image tower {type(visual).__name__}", field="backbone")

    def _run(self, x: Tensor) -> Any:
        self._batch = x.shape[0]
        return self.model(x)

    def _to_tokens(self, index: int, out: Any) -> Tensor:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if out.dim() == 3:
            batch_first = getattr(getattr(self.model, "transformer", None), "batch_first", None)
            return _batch_major(out, self._batch, batch_first)
        return super()._to_tokens(index, out)

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        if index in self._map_grids:
            return super()._layer_spec(index, tokens)
        grid_size = getattr(self.model, "grid_size", None)
        if grid_size is None and hasattr(self.model, "trunk"):
            found = token_grid(self.model.trunk)
            grid_size = found[0] if found else None
        if grid_size is None:
            return LayerSpec(width=int(tokens.shape[-1]))
        gh, gw = int(grid_size[0]), int(grid_size[1])
        prefix = tokens.shape[1] - gh * gw  # class / register tokens before the patch grid
        if prefix < 0:
            raise ValueError(f"layer {index}: {tokens.shape[1]} tokens cannot hold a {gh}x{gw} grid")
        return LayerSpec(width=int(tokens.shape[-1]), grid=(gh, gw), prefix=prefix)

    def output(self, x: Tensor) -> Tensor:
        """`encode_image` (unnormalised), i.e. the tower's pooled, projected embedding."""
        out = self._run(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def example_input(self, batch_size: int = 2) -> Tensor:
        size = self.model.preprocess_cfg.get("size", getattr(self.model, "image_size", 224))
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        param = next(self.model.parameters())
        return torch.randn(batch_size, 3, h, w, device=param.device, dtype=param.dtype)

    def transform(self, train: bool) -> Any:
        """open_clip's own preprocessing for this model (the one `create_model_and_transforms` returns)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.model.preprocess_cfg), is_train=train)

    def spec(self) -> dict[str, Any]:
        return {"kind": "open_clip_image", "name": self.name, "kwargs": self.model_kwargs}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OpenClipImage:
        """Rebuild the architecture (random init) from `spec()`."""
        return cls(spec["name"], **spec.get("kwargs", {}))


class OpenClipText(Backbone):
    """open_clip text tower; layers = text transformer resblocks (causal attention for CLIP)."""

    modality = "text"

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        *,
        clip: nn.Module | None = None,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if clip is None:
            clip = create_clip(name, pretrained, checkpoint, **model_kwargs)
        self.name, self.model_kwargs = name, dict(model_kwargs)
        self.model = clip.text
        self._tokenizer: Any = None
        self._batch = 0
        self._setup()

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    def _block_modules(self) -> list[nn.Module]:
        transformer = getattr(self.model, "transformer", None)
        if transformer is not None and hasattr(transformer, "resblocks"):
            return list(transformer.resblocks)
        raise UserError(
            f"unsupported open_clip text tower {type(self.model).__name__} (use hf_text for HF towers)",
            field="backbone",
        )

    def _ids(self, x: Any) -> Tensor:
        return x["input_ids"] if isinstance(x, dict) else x

    def _run(self, x: Any) -> Any:
        ids = self._ids(x)
        self._batch = ids.shape[0]
        return self.model(ids)

    def _to_tokens(self, index: int, out: Any) -> Tensor:
        out = out[0] if isinstance(out, (tuple, list)) else out
        batch_first = getattr(self.model.transformer, "batch_first", None)
        tokens = _batch_major(out, self._batch, batch_first)
        if getattr(self.model, "cls_emb", None) is not None:
            tokens = tokens[:, :-1]  # CoCa appends a class token; keep one token per input id
        return tokens

    def output(self, x: Any) -> Tensor:
        """`encode_text` (unnormalised): the pooled (EOT) token, projected."""
        out = self._run(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def padding_mask(self, x: Any) -> Tensor:
        """Valid tokens: the given attention mask, else every token up to the last non-pad id."""
        if isinstance(x, Precomputed):
            return x.mask
        if isinstance(x, dict) and "attention_mask" in x:
            return x["attention_mask"].bool()
        return _valid_prefix(self._ids(x), int(getattr(self.model, "pad_id", 0)))

    def example_input(self, batch_size: int = 2) -> dict[str, Tensor]:
        device = next(self.model.parameters()).device
        ids = torch.randint(1, int(self.model.vocab_size), (batch_size, self.context_length), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        """open_clip's tokenizer; ids are always `context_length` long (the causal mask is fixed-size)."""
        import open_clip

        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self.name, context_length=self.context_length)
        length = min(max_length or self.context_length, self.context_length)
        ids = self._tokenizer(list(texts), context_length=length)
        pad_id = int(getattr(self.model, "pad_id", 0))
        if length < self.context_length:
            ids = torch.nn.functional.pad(ids, (0, self.context_length - length), value=pad_id)
        return {"input_ids": ids, "attention_mask": _valid_prefix(ids, pad_id).long()}

    def spec(self) -> dict[str, Any]:
        return {"kind": "open_clip_text", "name": self.name, "kwargs": self.model_kwargs}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OpenClipText:
        """Rebuild the architecture (random init) from `spec()`."""
        return cls(spec["name"], **spec.get("kwargs", {}))


def _valid_prefix(ids: Tensor, pad_id: int) -> Tensor:
    """`B x N` bool: positions up to the last non-pad token (a pad-valued id inside text stays valid)."""
    n = ids.shape[-1]
    positions = torch.arange(1, n + 1, device=ids.device)
    length = ((ids != pad_id) * positions).amax(dim=-1, keepdim=True)
    return positions.unsqueeze(0) <= length
