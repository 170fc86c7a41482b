"""timm CNNs (EfficientNet, ResNet/ResNeXt, ConvNeXt-style stages) as backbones: stages are the layers.

EfficientNet: `conv_stem`/`bn1` are the stem, not a layer; every `blocks[i]` stage is a layer, and the
head conv (`conv_head` + `bn2`) is one more layer so that b_L is the model's final feature map.
ResNet/ResNeXt: `layer1..layer4`. Models with a `stages` list (ConvNeXt, RegNet, ...): each stage.
BatchNorm affine parameters count as norms (see `base.is_norm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec, grid_from_map, is_norm
from mdpd_vl.errors import UserError


def timm_layer_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are a timm model's layers, shallow to deep (see module docstring)."""
    if hasattr(model, "conv_stem") and isinstance(getattr(model, "blocks", None), nn.Sequential):
        layers = list(model.blocks)
        head_norm = getattr(model, "bn2", None)
        # bn2 follows conv_head before pooling, so its output (norm + act) is the final feature map
        if isinstance(getattr(model, "conv_head", None), nn.Conv2d) and head_norm is not None:
            if is_norm(head_norm):
                layers.append(head_norm)
        return layers
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)):
        return [getattr(model, f"layer{i}") for i in range(1, 5)]
    if isinstance(getattr(model, "stages", None), nn.Sequential):
        return list(model.stages)
    if isinstance(getattr(model, "blocks", None), nn.Sequential):  # timm ViT-like: token blocks
        return list(model.blocks)
    raise UserError(
        f"cannot find the stages of timm model {type(model).__name__} "
        "(expected blocks+conv_stem, layer1..layer4, stages or blocks)",
        field="backbone",
    )


def token_grid(model: nn.Module) -> tuple[tuple[int, int], int] | None:
    """(patch grid, prefix token count) of a timm token model (ViT-like), else None."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    if grid is None:
        return None
    return (int(grid[0]), int(grid[1])), int(getattr(model, "num_prefix_tokens", 0))


class MapGridMixin:
    """Records the H x W of each layer's raw `B x C x H x W` map before it is flattened to tokens."""

    _map_grids: dict[int, tuple[int, int]]

    def _to_tokens(self, index: int, out: Any) -> Tensor:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if out.dim() == 4:
            self._map_grids[index] = grid_from_map(out.shape)
        return super()._to_tokens(index, out)  # type: ignore[misc]

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        return LayerSpec(width=int(tokens.shape[-1]), grid=self._map_grids.get(index))


def load_weights_file(path: str | Path, *, field: str = "checkpoint") -> dict[str, Tensor]:
    """Read a state dict from a .safetensors or torch file (torch files with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", where=str(path), field=field)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state.get(key), dict):
                return state[key]
    if not isinstance(state, dict):
        raise UserError("not a state dict", where=str(path), field=field)
    return state


class TimmCNN(MapGridMixin, Backbone):
    """A timm model with its stages as layers; `output(x)` is the model's own output (logits)."""

    modality = "image"

    def __init__(
        self,
        name: str,
        pretrained: bool = False,
        checkpoint: str | None = None,
        image_size: int | None = None,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        self.name, self.kwargs, self.image_size = name, dict(kwargs), image_size
        self._map_grids = {}
        if model is None:
            if not timm.is_model(name.split(".")[0]):
                raise UserError(f"unknown timm model {name!r}", field="backbone.name")
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        self.model = model
        if checkpoint is not None:
            self.model.load_state_dict(load_weights_file(checkpoint))
        self._token_grid = token_grid(self.model)
        self._setup()

    def _block_modules(self) -> list[nn.Module]:
        return timm_layer_modules(self.model)

    def _run(self, x: Tensor) -> Tensor:
        return self.model(x)

    def data_config(self) -> dict[str, Any]:
        """timm's resolved preprocessing config (input size, mean, std, interpolation, crop)."""
        from timm.data import resolve_data_config

        args = {"input_size": (3, self.image_size, self.image_size)} if self.image_size else {}
        return resolve_data_config(args, model=self.model)

    def example_input(self, batch_size: int = 2) -> Tensor:
        c, h, w = self.data_config()["input_size"]
        param = next(self.model.parameters())
        return torch.randn(batch_size, c, h, w, device=param.device, dtype=param.dtype)

    def transform(self, train: bool) -> Any:
        """PIL -> tensor preprocessing from timm's own data config."""
        from timm.data import create_transform

        return create_transform(**self.data_config(), is_training=train)

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        if index not in self._map_grids and self._token_grid is not None:
            grid, prefix = self._token_grid
            return LayerSpec(width=int(tokens.shape[-1]), grid=grid, prefix=prefix)
        return super()._layer_spec(index, tokens)

    def spec(self) -> dict[str, Any]:
        return {"kind": "timm", "name": self.name, "image_size": self.image_size, "kwargs": self.kwargs}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TimmCNN:
        """Rebuild the architecture (random init) from `spec()`."""
        return cls(spec["name"], image_size=spec.get("image_size"), **spec.get("kwargs", {}))
