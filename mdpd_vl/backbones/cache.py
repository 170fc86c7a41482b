"""Frozen-feature cache: per-layer backbone features computed once, reused every epoch.

Exact only when the backbone does not change and its inputs are deterministic (frozen backbone,
eval-mode transforms): linear probes, side-kept networks and MDPD with `backbone_trainable: head`.
The key covers the backbone recipe, a hash of its weights and the caller's description of the
data, so a changed model or dataset never reads a stale file.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from mdpd_vl import dist
from mdpd_vl.atomic import tensor_bytes, write_with
from mdpd_vl.backbones.base import Backbone, Precomputed


def weights_digest(module: torch.nn.Module) -> str:
    """sha1 over every parameter and buffer (names, shapes and bytes)."""
    h = hashlib.sha1()
    for name, t in list(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Per-layer features of N samples (`N x T_l x D_l`, stored float16) + an optional token mask."""

    def __init__(self, layers: list[Tensor], mask: Tensor | None):
        self.layers, self.mask = layers, mask

    def __len__(self) -> int:
        return self.layers[0].shape[0]

    def get(self, index: Tensor | list[int]) -> Precomputed:
        """Features of the given rows as a `Precomputed` batch (float32)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        layers = [t[idx].float() for t in self.layers]
        mask = None if self.mask is None else self.mask[idx]
        return Precomputed(layers, mask)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)


def cache_key(backbone: Backbone, data: Mapping[str, Any]) -> str:
    """Key from the backbone recipe, its weights and the caller's data description."""
    # "layout": 2 = b_0 (the first block's input) cached too where the backbone has one
    blob = json.dumps({"spec": backbone.spec(), "weights": weights_digest(backbone), "data": data, "layout": 2},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def compute_features(backbone: Backbone, batches: Iterable[Any], total: int | None = None,
                     desc: str = "caching features") -> FeatureStore:
    """Run the frozen backbone (eval mode) over `batches` and keep every layer as float16 (with b_0,
    the input of the first block, in front when the backbone has one: side networks read it)."""
    was = backbone.training
    backbone.eval()
    chunks: list[list[Tensor]] = []
    masks: list[Tensor] = []
    for x in tqdm(batches, total=total, desc=desc, unit="batch", file=sys.stderr):
        feats = backbone.features(x, with_input=backbone.input_spec is not None)
        chunks.append([f.to(torch.float16).cpu() for f in feats])
        m = backbone.padding_mask(x)
        if m is not None:
            masks.append(m.cpu())
    backbone.train(was)
    # text batches are padded to their own longest caption: pad every chunk to the longest overall
    longest = [max(c[i].shape[1] for c in chunks) for i in range(len(chunks[0]))]
    layers = [torch.cat([_pad_tokens(c[i], n) for c in chunks]) for i, n in enumerate(longest)]
    mask = torch.cat([_pad_tokens(m.unsqueeze(-1), max(longest)).squeeze(-1) for m in masks]) if masks else None
    return FeatureStore(layers, mask)


def _pad_tokens(t: Tensor, n: int) -> Tensor:
    """Zero-pad the token axis (dim 1) of `t` to length `n` (False for bool masks)."""
    if t.shape[1] == n:
        return t
    pad = t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


def cached_features(backbone: Backbone, batches: Iterable[Any], folder: str | Path | None,
                    data: Mapping[str, Any], total: int | None = None, desc: str = "caching features"
                    ) -> tuple[FeatureStore, bool]:
    """Load the features for (backbone, data) from `folder`, computing and saving them when absent.

    Returns (store, hit). With `folder=None` the features are computed and kept in memory only.
    Several processes: the main one computes and writes the file first, the others then read it
    (one that does not see it computes in memory and writes nothing).
    """
    if folder is None:
        return compute_features(backbone, batches, total, desc), False
    path = Path(folder) / f"features-{cache_key(backbone, data)}.safetensors"
    with dist.main_first():
        if path.is_file():
            tensors = load_file(str(path))
            n = sum(1 for k in tensors if k.startswith("layer"))
            return FeatureStore([tensors[f"layer{i}"] for i in range(n)], tensors.get("mask")), True
        store = compute_features(backbone, batches, total, desc)
        if dist.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {f"layer{i}": t.contiguous() for i, t in enumerate(store.layers)}
            if store.mask is not None:
                tensors["mask"] = store.mask.contiguous()
            write_with(path, lambda tmp: save_file(tensors, tmp), tensor_bytes(tensors))  # atomic; full disk: one line
        return store, False
