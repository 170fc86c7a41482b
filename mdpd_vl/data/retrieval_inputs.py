"""Model inputs for image-text retrieval: live (images + tokens) or from the frozen-feature cache.

Both paths yield the same batch layout, `{"image": ..., "text": ..., "image_index": LongTensor}`,
where `image` / `text` are what the towers' backbones accept: tensors and token dicts when live,
`Precomputed` per-layer features when cached. The recipe does not need to know which it got.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.backbones.cache import FeatureStore, cached_features
from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import ImageTextEval, ImageTextPairs


class PairIndices(Dataset):
    """One item per (image, caption) pair: indices into the cached image and caption stores."""

    def __init__(self, caption_to_image: Sequence[int]):
        self.caption_to_image = list(caption_to_image)

    def __len__(self) -> int:
        return len(self.caption_to_image)

    def __getitem__(self, j: int) -> dict[str, int]:
        return {"image_index": self.caption_to_image[j], "caption_flat": j}


class CachedPairCollate:
    """Collate `PairIndices` items into `Precomputed` image and text batches."""

    def __init__(self, images: FeatureStore, texts: FeatureStore):
        self.images, self.texts = images, texts

    def __call__(self, items: list[dict[str, int]]) -> dict[str, Any]:
        img = torch.tensor([it["image_index"] for it in items])
        cap = torch.tensor([it["caption_flat"] for it in items])
        return {"image": self.images.get(img), "text": self.texts.get(cap), "image_index": img}


class LivePairCollate:
    """Collate `ImageTextPairs` samples: stacked image tensors and tokenised captions."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]]):
        self.inner = Collator(tokenize, text_key="caption")

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(samples)
        return {"image": batch["image"], "text": batch["text"], "image_index": batch["image_index"],
                "skipped": batch.get("skipped", 0)}


def caption_batches(captions: Sequence[str], tokenize: Callable[[list[str]], Any], batch_size: int) -> Iterator[Any]:
    """Tokenised captions in order, `batch_size` at a time."""
    for i in range(0, len(captions), batch_size):
        yield tokenize(list(captions[i : i + batch_size]))


def image_batches(evalset: ImageTextEval, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
    """Every image of an eval split once, in index order."""
    loader = DataLoader(evalset.images, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=lambda s: torch.stack([x["image"] for x in s]))
    yield from loader


def store_batches(store: FeatureStore, batch_size: int) -> Iterator[Any]:
    """A feature store's rows in order, as `Precomputed` batches."""
    for i in range(0, len(store), batch_size):
        yield store.get(list(range(i, min(i + batch_size, len(store)))))


def cache_split(
    image_backbone: Backbone,
    text_backbone: Backbone,
    evalset: ImageTextEval,
    tokenize: Callable[[list[str]], Any],
    folder: Any,
    data_key: dict[str, Any],
    batch_size: int,
) -> tuple[FeatureStore, FeatureStore, bool]:
    """Per-layer features of every image and every caption of a split (cached on disk)."""
    n_img, n_cap = len(evalset.images), len(evalset.captions)
    img, hit_i = cached_features(image_backbone, image_batches(evalset, batch_size), folder,
                                 {**data_key, "part": "images"}, total=-(-n_img // batch_size),
                                 desc=f"caching image features ({data_key.get('split')})")
    txt, hit_t = cached_features(text_backbone, caption_batches(evalset.captions, tokenize, batch_size), folder,
                                 {**data_key, "part": "captions"}, total=-(-n_cap // batch_size),
                                 desc=f"caching caption features ({data_key.get('split')})")
    return img, txt, hit_i and hit_t


def train_pairs(index: Any, transform: Callable) -> ImageTextPairs:
    """Every (image, caption) pair of a training index, one item each (VSE-infinity's epoch)."""
    return ImageTextPairs(index, transform, per="caption")
