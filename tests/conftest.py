"""Shared tiny backbones (random init, no downloads): an open_clip ViT, a transformers BERT, a timm CNN.

Fixtures `tiny_vit`, `tiny_bert`, `tiny_cnn` return a freshly built backbone each time (tests may
modify it: LoRA, adapters, training). Other test files may import the builders and the configs:
`from conftest import build_tiny_vit, VIT_CFG`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mdpd_vl.backbones.base import Backbone

# the architectures the tests reason about (analytic counts are computed from these numbers)
VIT_CFG = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=4.0)
BERT_CFG = dict(
    model_type="bert",
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)
CNN_CFG = dict(name="resnet18", image_size=64, layers=(1, 1, 1, 1), channels=(8, 16, 32, 64), stem_width=8)


def build_tiny_vit(layers: int | None = None) -> Backbone:
    """open_clip ViT image tower: 32x32 input, 8x8 patches (4x4 grid + class token), width 32."""
    from mdpd_vl.backbones.open_clip import OpenClipImage

    vision = dict(VIT_CFG, layers=layers or VIT_CFG["layers"])
    text = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)
    return OpenClipImage("ViT-B-32", embed_dim=16, vision_cfg=vision, text_cfg=text)


def build_tiny_bert(layers: int | None = None) -> Backbone:
    """transformers BERT text encoder: width 32, MLP 64."""
    from mdpd_vl.backbones.hf import HFText

    return HFText(config=dict(BERT_CFG, num_hidden_layers=layers or BERT_CFG["num_hidden_layers"]))


def build_tiny_cnn() -> Backbone:
    """timm ResNet (BasicBlocks, BatchNorm) with stages of width 8/16/32/64 on 64x64 input."""
    from mdpd_vl.backbones.timm import TimmCNN

    cfg = dict(CNN_CFG)
    name, size = cfg.pop("name"), cfg.pop("image_size")
    return TimmCNN(name, image_size=size, **cfg)


BUILDERS: dict[str, Callable[[], Backbone]] = {
    "vit": build_tiny_vit,
    "bert": build_tiny_bert,
    "cnn": build_tiny_cnn,
}


def make_input(backbone: Backbone, batch: int = 4, seed: int = 0) -> Any:
    """A deterministic input batch (text batches contain a padded row)."""
    torch.manual_seed(seed)
    return backbone.example_input(batch)


@pytest.fixture
def tiny_vit() -> Backbone:
    torch.manual_seed(0)
    return build_tiny_vit()


@pytest.fixture
def tiny_bert() -> Backbone:
    torch.manual_seed(0)
    return build_tiny_bert()


@pytest.fixture
def tiny_cnn() -> Backbone:
    torch.manual_seed(0)
    return build_tiny_cnn()
