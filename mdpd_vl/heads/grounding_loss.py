"""Hungarian matching and the set losses of the grounding head, and the matched-query distillation.

Follows ashkamath/mdetr `models/matcher.py` `HungarianMatcher` and `models/mdetr.py` `SetCriterion`
(`loss_labels`, `loss_boxes`, `loss_contrastive_align`):
- cost = cost_bbox * L1(box) + cost_class * -(softmax(logits) . positive_map) + cost_giou * -GIoU, solved per
  sample by `scipy.optimize.linear_sum_assignment`;
- score loss: MDETR's soft token cross-entropy. Each query predicts a distribution over the text-token slots +
  one no-object slot; a matched query's target is the normalised positive map of its phrase, every other query's
  target is no-object, weighted `eos_coef` (0.1). The score of a query is 1 - p(no-object).
- box losses: L1 and 1 - GIoU on the matched pairs, each summed and divided by the number of target boxes;
- contrastive alignment (optional): query <-> token InfoNCE over the phrase tokens, both directions.
Box conversion and GIoU are `torchvision.ops` (`box_convert`, `generalized_box_iou`, `generalized_box_iou_loss`).

Deviation: for a referring expression MDETR's positive span is the root noun phrase found by spaCy
(scripts/fine-tuning/refexp_coco_format.py `get_root_and_nouns`); the canonical index carries no spans, so the
whole expression (every non-special token) is the span here. The score used at test time (1 - p(no-object))
is MDETR's either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mdpd_vl.heads.grounding import GroundingConfig, GroundingOutput

Indices = list[tuple[Tensor, Tensor]]


@dataclass
class Targets:
    """Per sample `i`: `boxes[i]` (n_i x 4, normalised cx, cy, w, h), `positive_map[i]` (n_i x T, rows sum
    to 1) and, for the contrastive alignment, `token_mask[i]` (n_i x L bool over the text tokens)."""

    boxes: list[Tensor]
    positive_map: list[Tensor]
    token_mask: list[Tensor] | None = None

    @classmethod
    def single(cls, boxes: Tensor, positive_map: Tensor, token_mask: Tensor | None = None) -> Targets:
        """One target box per sample (a referring expression): `B x 4`, `B x T`, `B x L`."""
        masks = None if token_mask is None else list(token_mask[:, None])
        return cls(list(boxes[:, None]), list(positive_map[:, None]), masks)

    @property
    def num_boxes(self) -> float:
        return float(max(1, sum(len(b) for b in self.boxes)))


def _xyxy(boxes: Tensor) -> Tensor:
    from torchvision.ops import box_convert

    return box_convert(boxes, "cxcywh", "xyxy")


@torch.no_grad()
def hungarian_match(out: GroundingOutput, targets: Targets, cost_class: float = 1.0, cost_bbox: float = 5.0,
                    cost_giou: float = 2.0) -> Indices:
    """Per sample (query indices, target indices) of the minimum-cost assignment (MDETR `HungarianMatcher`)."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    prob = out.logits.float().softmax(-1)
    result: Indices = []
    for i, (tgt_boxes, tgt_map) in enumerate(zip(targets.boxes, targets.positive_map)):
        pred = out.boxes[i].float()
        tgt = tgt_boxes.to(pred)
        c_class = -(prob[i][:, None, :-1] * tgt_map.to(pred)[None]).sum(-1)
        c_bbox = torch.cdist(pred, tgt, p=1)
        c_giou = -generalized_box_iou(_xyxy(pred), _xyxy(tgt))
        cost = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        dev = out.boxes.device
        result.append((torch.as_tensor(rows, dtype=torch.long, device=dev),
                       torch.as_tensor(cols, dtype=torch.long, device=dev)))
    return result


def _src(indices: Indices) -> tuple[Tensor, Tensor]:
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def matched_queries(indices: Indices) -> Tensor:
    """The matched query of each sample when every sample has exactly one target: `B` long."""
    if any(len(src) != 1 for src, _ in indices):
        raise ValueError("matched_queries needs exactly one target per sample")
    return torch.cat([src for src, _ in indices])


def label_loss(out: GroundingOutput, targets: Targets, indices: Indices, eos_coef: float) -> Tensor:
    """MDETR `loss_labels`: soft cross-entropy to the positive map (matched) or no-object (others)."""
    logp = out.logits.log_softmax(-1)
    target = torch.zeros_like(logp)
    target[:, :, -1] = 1.0
    weight = torch.full(logp.shape[:2], eos_coef, dtype=logp.dtype, device=logp.device)
    b, q = _src(indices)
    if len(b):
        rows = torch.cat([pm[tgt] for pm, (_, tgt) in zip(targets.positive_map, indices)]).to(logp)
        target[b, q] = F.pad(rows, (0, 1))  # matched: the phrase's tokens, no-object slot 0
        weight[b, q] = 1.0
    return (-(logp * target).sum(-1) * weight).sum() / targets.num_boxes


def box_losses(out: GroundingOutput, targets: Targets, indices: Indices) -> tuple[Tensor, Tensor]:
    """MDETR `loss_boxes`: (L1, 1 - GIoU) of the matched pairs, each summed / number of targets."""
    from torchvision.ops import generalized_box_iou_loss

    b, q = _src(indices)
    src = out.boxes[b, q]
    tgt = torch.cat([t[j] for t, (_, j) in zip(targets.boxes, indices)]).to(src)
    l1 = F.l1_loss(src, tgt, reduction="sum") / targets.num_boxes
    giou = generalized_box_iou_loss(_xyxy(src), _xyxy(tgt), reduction="sum") / targets.num_boxes
    return l1, giou


def align_loss(out: GroundingOutput, targets: Targets, indices: Indices, temperature: float) -> Tensor:
    """MDETR `loss_contrastive_align`: matched query <-> its phrase tokens, box-to-token + token-to-box."""
    if out.proj_queries is None or out.proj_tokens is None or targets.token_mask is None:
        raise ValueError("contrastive alignment needs proj_queries, proj_tokens and targets.token_mask")
    logits = out.proj_queries @ out.proj_tokens.transpose(-1, -2) / temperature  # B x Q x L
    positive = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for i, (src, tgt) in enumerate(indices):
        for s, t in zip(src.tolist(), tgt.tolist()):
            positive[i, s] = targets.token_mask[i][t].to(logits.device).bool()[: logits.shape[-1]]
    if out.text_valid is not None:  # padding tokens are neither positives nor negatives
        logits = logits.masked_fill(~out.text_valid.bool()[:, None, :], -1e4)
    pos_logits = -logits.masked_fill(~positive, 0.0)
    box_has = positive.any(2)
    box_to_token = (pos_logits.sum(2) / (positive.sum(2) + 1e-6) + logits.logsumexp(2)).masked_fill(~box_has, 0)
    tok_has = positive.any(1)
    token_to_box = (pos_logits.sum(1) / (positive.sum(1) + 1e-6) + logits.logsumexp(1)).masked_fill(~tok_has, 0)
    return (box_to_token.sum() + token_to_box.sum()) / 2 / targets.num_boxes


def set_losses(out: GroundingOutput, targets: Targets, cfg: GroundingConfig) -> tuple[dict[str, Tensor], Indices]:
    """Weighted MDETR losses of the last layer ('ce', 'bbox', 'giou', 'align') and of every aux layer
    ('ce_0', ...), with the last layer's matching (for the matched-query distillation)."""
    losses: dict[str, Tensor] = {}
    final: Indices = []
    for k, layer in enumerate([*out.aux, out]):
        suffix = "" if k == len(out.aux) else f"_{k}"
        indices = hungarian_match(layer, targets, cfg.cost_class, cfg.cost_bbox, cfg.cost_giou)
        l1, giou = box_losses(layer, targets, indices)
        losses["ce" + suffix] = cfg.ce_coef * label_loss(layer, targets, indices, cfg.eos_coef)
        losses["bbox" + suffix] = cfg.bbox_coef * l1
        losses["giou" + suffix] = cfg.giou_coef * giou
        if not suffix and cfg.contrastive_align and layer.proj_queries is not None:
            losses["align"] = cfg.align_coef * align_loss(layer, targets, indices, cfg.temperature)
        final = indices
    return losses, final


def matched_distillation(teacher: GroundingOutput, t_query: Tensor, student: GroundingOutput, s_query: Tensor,
                         cfg: GroundingConfig, objective: str = "match") -> Tensor:
    """The side path teaches the backbone path on the matched queries (teacher detached here).

    'match' (default): the teacher's matched prediction is the student's target, with the task's own terms:
    bbox_coef * L1 + giou_coef * (1 - GIoU) on the boxes + ce_coef * soft cross-entropy of the student's token
    distribution to the teacher's. 'mse' (the paper's eq. 3): sum of squared differences of the matched query's
    box and logits, per sample; both are averaged over the batch.
    """
    from torchvision.ops import generalized_box_iou_loss

    rows = torch.arange(len(t_query), device=t_query.device)
    tb, tl = teacher.boxes[rows, t_query].detach(), teacher.logits[rows, t_query].detach()
    sb, sl = student.boxes[rows, s_query], student.logits[rows, s_query]
    n = max(1, len(rows))
    if objective == "mse":
        return ((tb - sb).pow(2).sum() + (tl - sl).pow(2).sum()) / n
    if objective != "match":
        raise ValueError(f"unknown objective {objective!r}; valid: match, mse")
    l1 = F.l1_loss(sb, tb, reduction="sum") / n
    giou = generalized_box_iou_loss(_xyxy(sb), _xyxy(tb), reduction="sum") / n
    ce = -(tl.softmax(-1) * sl.log_softmax(-1)).sum() / n
    return cfg.bbox_coef * l1 + cfg.giou_coef * giou + cfg.ce_coef * ce
