"""VSE hinge-triplet loss (margin 0.2) over hardest negatives, with the all-negatives warm-up.

Both losses range over the batch they are given. Across several processes, pass them the global
batch: `img, txt, ids = mdpd_vl.dist.gather_batch(img, txt, ids)` first (gradients reach each
process's own rows, scaled so that averaged gradients are the one-process gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def vse_loss(
    img: Tensor,
    txt: Tensor,
    margin: float = 0.2,
    max_violation: bool = True,
    image_ids: Tensor | None = None,
) -> Tensor:
    """Sum of hinge costs both ways for L2-normalised embeddings; row i of `img` pairs with `txt[i]`.

    `max_violation=False` sums over all negatives (VSE-infinity's warm-up); True keeps only the
    hardest negative per query. When `image_ids` is given, captions of the same image are never
    used as negatives (a batch may hold two captions of one image).
    """
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    scores = img @ txt.t()
    pos = scores.diag()
    cost_txt = (margin + scores - pos.view(-1, 1)).clamp(min=0)  # image query vs wrong captions
    cost_img = (margin + scores - pos.view(1, -1)).clamp(min=0)  # caption query vs wrong images
    if image_ids is None:
        same = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    else:
        same = image_ids.view(-1, 1) == image_ids.view(1, -1)
    cost_txt = cost_txt.masked_fill(same, 0)
    cost_img = cost_img.masked_fill(same, 0)
    if max_violation:
        return cost_txt.max(dim=1)[0].sum() + cost_img.max(dim=0)[0].sum()
    return cost_txt.sum() + cost_img.sum()


def info_nce(img: Tensor, txt: Tensor, temperature: float = 0.05, image_ids: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over L2-normalised embeddings (other captions of the same image masked)."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = img @ txt.t() / temperature
    if image_ids is not None:
        same = image_ids.view(-1, 1) == image_ids.view(1, -1)
        logits = logits.masked_fill(same & ~torch.eye(len(logits), dtype=torch.bool, device=logits.device), -1e4)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
