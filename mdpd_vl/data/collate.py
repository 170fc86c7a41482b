"""Collate functions: stack what has one shape, pad what varies (with a mask), tokenise the text.

Tokenisation goes through the backbone's own tokenizer, passed in as a callable
`tokenize(texts) -> {"input_ids": B x L, "attention_mask": B x L}` (a text backbone's `tokenize`),
so padding, special tokens and the maximum length are the model's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

Tokenize = Callable[[list[str]], Mapping[str, Tensor]]
# sample key -> (mask key, padded axis 0) for tensors whose first axis varies between samples
PADDED = {"video": "frame_mask", "regions": "region_mask"}
# counters the datasets attach to each sample; the batch carries their sum
SUMMED = {"skipped": "skipped", "short": "short_videos"}


def pad_stack(tensors: Sequence[Tensor], value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Stack tensors whose first axis differs: `B x T_max x ...` padded with `value`, and a
    `B x T_max` bool mask that is True on real entries."""
    t_max = max(t.shape[0] for t in tensors)
    out = tensors[0].new_full((len(tensors), t_max, *tensors[0].shape[1:]), value)
    mask = torch.zeros(len(tensors), t_max, dtype=torch.bool)
    for b, t in enumerate(tensors):
        out[b, : t.shape[0]] = t
        mask[b, : t.shape[0]] = True
    return out, mask


def _check_tokens(tokens: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    missing = [k for k in ("input_ids", "attention_mask") if k not in tokens]
    if missing:
        raise ValueError(f"tokenize() must return input_ids and attention_mask; missing {missing}")
    out = {k: torch.as_tensor(v) for k, v in tokens.items()}
    if out["input_ids"].shape[0] != n or out["attention_mask"].shape != out["input_ids"].shape:
        raise ValueError(f"tokenize() returned input_ids {tuple(out['input_ids'].shape)} and attention_mask "
                         f"{tuple(out['attention_mask'].shape)} for {n} texts")
    return out


class Collator:
    """Batch a list of sample dicts.

    - `video` / `regions` (first axis varies): padded `B x T x ...` plus `frame_mask` / `region_mask`
      (a per-sample `frame_mask` is honoured);
    - other tensors of one shape: stacked; numbers and bools: tensors; strings, dicts, None: lists;
    - `text_key` (e.g. "caption", "question", "sentence") is also tokenised into `batch["text"]`;
    - per-sample counters (`skipped`, `short`) become batch totals (`skipped`, `short_videos`).
    """

    def __init__(self, tokenize: Tokenize | None = None, text_key: str | None = "caption"):
        self.tokenize, self.text_key = tokenize, text_key

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("empty batch")
        batch: dict[str, Any] = {}
        for key in samples[0]:
            values = [s[key] for s in samples]
            if key in SUMMED:
                batch[SUMMED[key]] = int(sum(int(v) for v in values))
            elif key in PADDED:
                batch[key], mask = pad_stack(values)
                if "frame_mask" in samples[0] and key == "video":
                    mask, _ = pad_stack([s["frame_mask"].bool() for s in samples], value=False)
                batch[PADDED[key]] = mask
            elif key in PADDED.values() and any(k in samples[0] for k in PADDED):
                continue  # built with its padded tensor above
            else:
                batch[key] = self._stack(key, values)
        if self.text_key is not None and self.tokenize is not None:
            texts = batch.get(self.text_key)
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise KeyError(f"samples have no text field {self.text_key!r} to tokenise")
            batch["text"] = _check_tokens(self.tokenize(texts), len(texts))
        return batch

    @staticmethod
    def _stack(key: str, values: list[Any]) -> Any:
        first = values[0]
        if isinstance(first, Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack {key!r}: shapes {sorted(shapes)} differ (resize in the transform)")
            return torch.stack(values)
        if isinstance(first, bool):
            return torch.tensor(values, dtype=torch.bool)
        if isinstance(first, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            return torch.tensor(values)
        return list(values)


def collate_fn(tokenize: Tokenize | None = None, text_key: str | None = "caption") -> Collator:
    """A collate function for `torch.utils.data.DataLoader` (see Collator)."""
    return Collator(tokenize, text_key)
