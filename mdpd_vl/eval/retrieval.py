"""Image-text retrieval: Recall@K, medr, meanr and Rsum with VSE-infinity's conventions.

Reference: woodfrog/vse_infty lib/evaluation.py (`i2t`, `t2i`, `evalrank`). `sims` is images x
captions; caption j belongs to image `caption_to_image[j]`.
- i2t: an image's rank is the 0-based position of its best-ranked own caption.
- t2i: a caption's rank is the 0-based position of its image.
- R@K = 100 * |rank < K| / #queries; medr = floor(median(rank)) + 1; meanr = mean(rank) + 1;
  rsum = the six recalls; ar / ari are the i2t / t2i mean recalls.
- folds=5 (COCO 1K): contiguous blocks of images with their captions, every number averaged.

Ties (our choice, documented in eval/README.md): the reference sorts with `np.argsort`, so an
exact tie is broken by array order and can count a query as a hit by luck. We count ties against
the query instead: rank = #(non-matching candidates scoring >= the best matching score). With no
exact ties this equals the reference exactly; with ties it can only lower recall, never inflate it.
The ranks are counted, not sorted, in row chunks: O(Q x C) time and bounded memory (5K x 25K is fine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mdpd_vl.errors import UserError

# Upper bound on the elements of one boolean comparison block (about 16 MB).
_BLOCK_ELEMENTS = 1 << 24
RECALL_KS = (1, 5, 10)
ITR_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
            "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum", "ar", "ari")

PositiveMask = Callable[[int, int], np.ndarray]


def as_score_matrix(sims: Any, where: str = "sims") -> np.ndarray:
    """Return `sims` (numpy array or torch tensor) as a 2-D float numpy array; NaN is rejected."""
    if hasattr(sims, "detach"):  # torch tensor, without importing torch here
        sims = sims.detach().float().cpu().numpy()
    arr = np.asarray(sims)
    if arr.ndim != 2:
        raise UserError(f"expected a 2-D similarity matrix, got shape {tuple(arr.shape)}", where=where)
    if arr.dtype.kind not in "fiub":
        raise UserError(f"expected numbers, got dtype {arr.dtype}", where=where)
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserError(f"empty similarity matrix of shape {arr.shape}", where=where)
    if np.isnan(arr).any():
        bad = np.argwhere(np.isnan(arr))[0]
        raise UserError(f"contains NaN (first at row {bad[0]}, column {bad[1]})", where=where)
    return arr


def as_index_vector(values: Any, length: int, upper: int, where: str, what: str) -> np.ndarray:
    """Validate a 1-D integer vector of `length` entries, each in [0, upper)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise UserError(f"expected {length} entries (one per {what}), got shape {tuple(arr.shape)}",
                        where=where)
    if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise UserError(f"expected integer indices, got dtype {arr.dtype}", where=where)
    bad = np.flatnonzero((arr < 0) | (arr >= upper))
    if bad.size:
        raise UserError(f"entry {bad[0]} is {arr[bad[0]]}, outside [0, {upper}) "
                        f"({bad.size} out of range)", where=where)
    return arr.astype(np.int64)


def pessimistic_ranks(scores: np.ndarray, positive: PositiveMask) -> np.ndarray:
    """0-based rank of every row query: #(non-positive columns scoring >= its best positive score).

    `positive(r0, r1)` returns the boolean (r1 - r0) x C mask of positive columns of rows r0..r1-1;
    every row must have at least one positive. `scores` may be a strided view (e.g. a transpose).
    """
    n_rows, n_cols = scores.shape
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    ranks = np.empty(n_rows, dtype=np.int64)
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        block = np.asarray(scores[r0:r1])
        pos = positive(r0, r1)
        best = np.where(pos, block, -np.inf).max(axis=1)
        # A positive scoring -inf still ranks behind every -inf negative: ">=" keeps that pessimistic.
        ranks[r0:r1] = ((block >= best[:, None]) & ~pos).sum(axis=1)
    return ranks


def recall_stats(ranks: np.ndarray, median: str = "floor") -> dict[str, float]:
    """R@1/5/10 in percent, median rank and mean rank (1-based) from 0-based ranks.

    `median`: "floor" = floor(median) + 1 (VSE-infinity); "mean" = median + 1, which may end in .5
    (CLIP4Clip `compute_metrics`); "lower" = lower middle value + 1 (`torch.median`, CLIP4Clip's
    multi-sentence text-to-video).
    """
    n = len(ranks)
    out = {f"r{k}": 100.0 * float(np.count_nonzero(ranks < k)) / n for k in RECALL_KS}
    if median == "floor":
        medr = float(np.floor(np.median(ranks))) + 1
    elif median == "mean":
        medr = float(np.median(ranks)) + 1
    elif median == "lower":
        medr = float(np.sort(ranks)[(n - 1) // 2]) + 1
    else:
        raise ValueError(f"unknown median convention {median!r}")
    out["medr"] = medr
    out["meanr"] = float(np.mean(ranks)) + 1
    return out


def _itr_one(sims: np.ndarray, cap2img: np.ndarray) -> dict[str, float]:
    """All metrics of one (sub)matrix; every image has at least one caption (checked by the caller)."""
    n_img, n_cap = sims.shape
    img_ids = np.arange(n_img)

    def i2t_pos(r0: int, r1: int) -> np.ndarray:
        return cap2img[None, :] == img_ids[r0:r1, None]

    def t2i_pos(r0: int, r1: int) -> np.ndarray:
        return img_ids[None, :] == cap2img[r0:r1, None]

    i2t = recall_stats(pessimistic_ranks(sims, i2t_pos), "floor")
    t2i = recall_stats(pessimistic_ranks(sims.T, t2i_pos), "floor")
    out = {f"i2t_{k}": v for k, v in i2t.items()} | {f"t2i_{k}": v for k, v in t2i.items()}
    out["ar"] = (i2t["r1"] + i2t["r5"] + i2t["r10"]) / 3
    out["ari"] = (t2i["r1"] + t2i["r5"] + t2i["r10"]) / 3
    out["rsum"] = i2t["r1"] + i2t["r5"] + i2t["r10"] + t2i["r1"] + t2i["r5"] + t2i["r10"]
    return {k: out[k] for k in ITR_KEYS}


def caption_owner(n_images: int, n_captions: int, caption_to_image: Sequence[int] | np.ndarray | None,
                  captions_per_image: int) -> np.ndarray:
    """The image of every caption: `caption_to_image`, or `j // captions_per_image` when None."""
    if caption_to_image is None:
        if captions_per_image < 1:
            raise UserError(f"must be >= 1, got {captions_per_image}", field="captions_per_image")
        if n_captions != n_images * captions_per_image:
            raise UserError(
                f"{n_images} images x {captions_per_image} captions per image = "
                f"{n_images * captions_per_image} columns expected, the matrix has {n_captions}; "
                "pass caption_to_image when images have different caption counts", where="sims")
        return np.arange(n_captions, dtype=np.int64) // captions_per_image
    owner = as_index_vector(caption_to_image, n_captions, n_images, "caption_to_image", "caption")
    counts = np.bincount(owner, minlength=n_images)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise UserError(f"image {missing[0]} has no caption ({missing.size} images without one)",
                        where="caption_to_image")
    return owner


def evaluate_itr(sims: Any, caption_to_image: Sequence[int] | np.ndarray | None = None,
                 captions_per_image: int = 5, folds: int = 1) -> dict[str, float]:
    """VSE-infinity retrieval metrics of an images x captions similarity matrix (numpy or torch).

    Keys: i2t_/t2i_ r1 r5 r10 medr meanr, rsum, ar, ari. `folds=5` is the COCO 1K protocol.
    """
    arr = as_score_matrix(sims)
    n_img, n_cap = arr.shape
    owner = caption_owner(n_img, n_cap, caption_to_image, captions_per_image)
    if not isinstance(folds, int | np.integer) or folds < 1:
        raise UserError(f"must be a positive integer, got {folds!r}", field="folds")
    if n_img % folds:
        raise UserError(f"{n_img} images cannot be split into {folds} equal contiguous folds",
                        field="folds")
    if folds == 1:
        return _itr_one(arr, owner)
    size = n_img // folds
    per_fold = []
    for f in range(folds):
        cols = np.flatnonzero((owner >= f * size) & (owner < (f + 1) * size))
        sub = arr[f * size:(f + 1) * size][:, cols]
        per_fold.append(_itr_one(sub, owner[cols] - f * size))
    # Like the reference: each number (rsum included) is the mean of its per-fold values.
    return {k: float(np.mean([m[k] for m in per_fold])) for k in ITR_KEYS}
