"""Tiny cross-modal backbones and shapes-world question sets for the VQA tests (no downloads).

The tiny BERT of conftest gets a word-level tokenizer built from the questions themselves
(`tokenizers` WordLevel + "[CLS] $A [SEP]"), so real question strings run through the real
tokenise -> collate -> model path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from conftest import BERT_CFG, build_tiny_cnn, build_tiny_vit

from mdpd_vl.backbones.crossmodal import CrossModalBackbone
from mdpd_vl.backbones.hf import HFText

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def word_tokenizer(texts: Iterable[str]) -> Any:
    """A BERT-style fast tokenizer whose vocabulary is the words of `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_text(tokenizer: Any = None, layers: int | None = None) -> HFText:
    """conftest's tiny BERT, sized to the tokenizer's vocabulary when one is given."""
    cfg = dict(BERT_CFG, num_hidden_layers=layers or BERT_CFG["num_hidden_layers"])
    if tokenizer is not None:
        cfg["vocab_size"] = len(tokenizer)
    return HFText(config=cfg, tokenizer=tokenizer)


def tiny_crossmodal(image: str = "cnn", tokenizer: Any = None, seed: int = 0, **kw: Any) -> CrossModalBackbone:
    """Tiny ResNet (64 px, 2x2 grid) or ViT (32 px, class token + 4x4) + tiny BERT."""
    torch.manual_seed(seed)
    tower = build_tiny_cnn() if image == "cnn" else build_tiny_vit()
    return CrossModalBackbone(tower, tiny_text(tokenizer), **kw)


def shapes_world(root: Path) -> Path:
    """The tiny shapes world (VQA and GQA in their original formats -> canonical indexes)."""
    from mdpd_vl.data.shapes_world import build_shapes

    build_shapes(root, "tiny", progress=False)
    return root


def questions_of(root: Path) -> list[str]:
    import json

    out = []
    for task, splits in (("vqa", ("train", "val")), ("gqa", ("train", "val", "testdev"))):
        for split in splits:
            out += [it["question"] for it in json.loads((root / task / f"{split}.index.json").read_text())["items"]]
    return out


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    state = {f"param:{n}": p.detach().clone() for n, p in module.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in module.named_buffers()})
    return state
