"""Backbone wrappers: any encoder exposing per-layer features and its norm parameters.

See mdpd_vl/README.md for the contract and backbones/README.md for how to add one. Every wrapper
module is imported only when a backbone of its kind is built, so `import mdpd_vl` stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.errors import UserError
from mdpd_vl.registry import Registry

__all__ = ["BACKBONES", "Backbone", "LayerSpec", "build_backbone", "build_pair"]

# kind -> "module:Class"; the class has `from_spec(spec)`, and its `spec()` names the same kind
BACKBONES: Registry[str] = Registry("backbone kind")
BACKBONES.register("open_clip_image", "mdpd_vl.backbones.open_clip:OpenClipImage")
BACKBONES.register("open_clip_text", "mdpd_vl.backbones.open_clip:OpenClipText")
BACKBONES.register("hf_text", "mdpd_vl.backbones.hf:HFText")
BACKBONES.register("hf_vision", "mdpd_vl.backbones.hf:HFVision")
BACKBONES.register("timm", "mdpd_vl.backbones.timm:TimmCNN")
BACKBONES.register("offline_image", "mdpd_vl.backbones.offline:OfflineImage")
BACKBONES.register("offline_text", "mdpd_vl.backbones.offline:OfflineText")
BACKBONES.register("crossmodal", "mdpd_vl.backbones.crossmodal:CrossModalBackbone")
BACKBONES.register("mdetr", "mdpd_vl.backbones.mdetr:MdetrBackbone")

HF_PREFIX = "hf:"  # build_pair("hf:<name or folder>"): both towers of a transformers dual encoder


def backbone_class(kind: str) -> type[Backbone]:
    """The wrapper class registered for `kind` (imports its module)."""
    module, _, attr = BACKBONES.get(kind, field="kind").partition(":")
    return getattr(importlib.import_module(module), attr)


def build_backbone(spec: dict[str, Any]) -> Backbone:
    """Rebuild a backbone's architecture (random init) from its `spec()`."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise UserError("a backbone spec must be a dict with a 'kind'", field="kind")
    return backbone_class(spec["kind"]).from_spec(spec)  # type: ignore[attr-defined]


def build_pair(name: str, pretrained: str | None = None) -> tuple[Backbone, Backbone]:
    """(image, text) backbones for a task: 'offline' (packaged weights, no network), an open_clip
    model name (+ tag or local file in `pretrained`), or 'hf:<name or folder>' (CLIP-like)."""
    if name == "offline":
        if pretrained not in (None, "", "offline"):
            raise UserError("the offline pair has its own weights; drop --pretrained", field="pretrained")
        from mdpd_vl.backbones.offline import offline_pair

        return offline_pair()
    if name.startswith(HF_PREFIX):
        from mdpd_vl.backbones.hf import HFText, HFVision

        source = name[len(HF_PREFIX) :]
        local = os.path.isdir(source)
        return HFVision(source, local_files_only=local), HFText(source, local_files_only=local)
    import open_clip

    if name in open_clip.list_models() or name.startswith(("hf-hub:", "local-dir:")):
        from mdpd_vl.backbones.open_clip import open_clip_pair

        return open_clip_pair(name, pretrained)
    raise UserError(
        f"unknown backbone {name!r}: use 'offline', an open_clip model name or 'hf:<name or folder>' "
        "(list: python -m mdpd_vl.backbones --list)",
        field="backbone",
    )
