"""Referring-expression grounding: Precision@0.5 (RefCOCO / RefCOCO+ / RefCOCOg).

- Standard (mmpretrain `VisualGroundingMetric`, most papers): the top-1 box is a hit when its
  IoU with the ground-truth box is >= 0.5 (so exactly 0.5 counts); accuracy = hits / expressions.
- MDETR (ashkamath/mdetr datasets/refexp.py `RefExpEvaluator`): the same, but thresholding the
  *generalized* IoU, which is never above the IoU, so it is slightly stricter; it also reports
  P@1/5/10 over the boxes sorted by score (`precision_at_k`).
- Boxes are pixel `xyxy`; COCO ground truth `[x, y, w, h]` is converted with `xywh_to_xyxy`, MDETR's
  normalised `cxcywh` predictions with `cxcywh_norm_to_xyxy` (scaled by the original W, H). No +1
  pixel convention. Results are percentages. A pair of zero-area boxes scores 0 (not NaN).
Box maths is torchvision.ops (`box_iou`, `generalized_box_iou`, `box_convert`), evaluated on aligned
pairs through a batch dimension, so N expressions cost O(N), not O(N^2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from mdpd_vl.errors import UserError

KINDS = ("iou", "giou")


def as_boxes(boxes: Any, where: str = "boxes") -> torch.Tensor:
    """Any (N, 4) array-like (list, numpy, torch) as a float64 CPU tensor; a single box becomes (1, 4)."""
    try:
        t = torch.as_tensor(boxes.detach().cpu() if hasattr(boxes, "detach") else boxes,
                            dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"not a numeric box array ({err})", where=where) from None
    if t.ndim == 1 and t.shape[0] == 4:
        t = t[None]
    if t.ndim != 2 or t.shape[1] != 4:
        raise UserError(f"expected boxes of shape (N, 4), got {tuple(t.shape)}", where=where)
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=1).nonzero()[0])
        raise UserError(f"box {bad} has a non-finite coordinate", where=where)
    return t


def _check_sizes(w: torch.Tensor, h: torch.Tensor, where: str) -> None:
    for name, v in (("width", w), ("height", h)):
        bad = (v < 0).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise UserError(f"box {i} has negative {name} ({float(v[i]):g})", where=where)


def check_xyxy(boxes: Any, where: str = "boxes") -> torch.Tensor:
    """Validate pixel `xyxy` boxes (x2 >= x1, y2 >= y1) and return them as a float64 tensor."""
    t = as_boxes(boxes, where)
    _check_sizes(t[:, 2] - t[:, 0], t[:, 3] - t[:, 1], where)
    return t


def xywh_to_xyxy(boxes: Any, where: str = "boxes") -> torch.Tensor:
    """COCO `[x, y, w, h]` (absolute pixels) -> `[x1, y1, x2, y2]`; negative w or h is an error."""
    t = as_boxes(boxes, where)
    _check_sizes(t[:, 2], t[:, 3], where)
    return box_convert(t, "xywh", "xyxy")


def cxcywh_norm_to_xyxy(boxes: Any, width: Any, height: Any, where: str = "boxes") -> torch.Tensor:
    """MDETR's normalised `[cx, cy, w, h]` -> pixel `xyxy`, scaled by the image (W, H, W, H);
    `width`/`height` are scalars or one value per box."""
    t = as_boxes(boxes, where)
    _check_sizes(t[:, 2], t[:, 3], where)
    w = torch.as_tensor(width, dtype=torch.float64).reshape(-1)
    h = torch.as_tensor(height, dtype=torch.float64).reshape(-1)
    if w.numel() not in (1, len(t)) or h.numel() not in (1, len(t)):
        raise UserError(f"width/height must be scalars or have {len(t)} entries", where=where)
    scale = torch.stack(torch.broadcast_tensors(w, h, w, h), dim=-1)
    return box_convert(t, "cxcywh", "xyxy") * scale


def aligned_overlap(pred_xyxy: Any, gt_xyxy: Any, kind: str = "iou") -> torch.Tensor:
    """IoU (or GIoU) of each prediction with the ground-truth box at the same index, shape (N,)."""
    if kind not in KINDS:
        raise UserError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}", field="kind")
    pred = check_xyxy(pred_xyxy, "pred_xyxy")
    gt = check_xyxy(gt_xyxy, "gt_xyxy")
    if pred.shape != gt.shape:
        raise UserError(f"{len(pred)} predicted boxes but {len(gt)} ground-truth boxes",
                        where="pred_xyxy")
    fn = box_iou if kind == "iou" else generalized_box_iou
    # A batch of 1x1 problems: the pairwise functions then give exactly the aligned values.
    values = fn(pred[:, None], gt[:, None]).reshape(-1)
    return torch.nan_to_num(values, nan=0.0)


def precision_at(pred_xyxy: Any, gt_xyxy: Any, threshold: float = 0.5, kind: str = "iou") -> float:
    """Percentage of aligned pairs whose IoU (kind="iou") or GIoU (kind="giou", MDETR) >= threshold."""
    values = aligned_overlap(pred_xyxy, gt_xyxy, kind)
    if values.numel() == 0:
        raise UserError("no boxes to evaluate", where="pred_xyxy")
    return 100.0 * float((values >= threshold).double().mean())


def precision_at_k(boxes: Sequence[Any], scores: Sequence[Any], gt_xyxy: Any,
                   ks: Sequence[int] = (1, 5, 10), threshold: float = 0.5, kind: str = "giou"
                   ) -> dict[int, float]:
    """MDETR's P@k: per expression, sort its boxes by score (descending) and count a hit at k when
    any of the first k boxes reaches `threshold`. Returns percent per k."""
    gt = check_xyxy(gt_xyxy, "gt_xyxy")
    if len(boxes) != len(gt) or len(scores) != len(gt):
        raise UserError(f"{len(boxes)} box lists and {len(scores)} score lists for {len(gt)} "
                        "expressions", where="boxes")
    hits = {k: 0 for k in ks}
    fn = box_iou if kind == "iou" else generalized_box_iou
    for i, (b, s) in enumerate(zip(boxes, scores)):
        cand = check_xyxy(b, f"boxes[{i}]")
        sc = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        if len(sc) != len(cand) or len(cand) == 0:
            raise UserError(f"expression {i}: {len(cand)} boxes and {len(sc)} scores", where="scores")
        order = torch.argsort(sc, descending=True, stable=True)
        values = torch.nan_to_num(fn(cand[order], gt[i:i + 1]).reshape(-1), nan=0.0)
        for k in ks:
            hits[k] += int(bool((values[:k] >= threshold).any()))
    return {k: 100.0 * hits[k] / len(gt) for k in ks}


def grounding_report(pred_xyxy: Any, gt_xyxy: Any, groups: Sequence[str], threshold: float = 0.5
                     ) -> dict[str, dict[str, float]]:
    """Per group (e.g. "refcoco/testA"): P@threshold with IoU and with GIoU, mean IoU, count."""
    iou = aligned_overlap(pred_xyxy, gt_xyxy, "iou")
    giou = aligned_overlap(pred_xyxy, gt_xyxy, "giou")
    if len(groups) != len(iou):
        raise UserError(f"{len(groups)} group labels for {len(iou)} boxes", field="groups")
    report: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(groups):  # first-seen order
        sel = torch.tensor([g == name for g in groups])
        report[name] = {
            "precision_iou": 100.0 * float((iou[sel] >= threshold).double().mean()),
            "precision_giou": 100.0 * float((giou[sel] >= threshold).double().mean()),
            "miou": 100.0 * float(iou[sel].mean()),
            "count": int(sel.sum()),
        }
    return report


def draw_examples(images: Sequence[Any], expressions: Sequence[str], pred_xyxy: Any, gt_xyxy: Any,
                  out_path: Any, *, columns: int = 4, tile: int = 256) -> Any:
    """One PNG of up to a dozen examples (people look at boxes before numbers): each image (a PIL image or a path)
    with its expression, the ground truth (green) and the predicted box (red), both in pixels of that image.
    Written atomically; returns the path."""
    import os
    import tempfile
    import textwrap
    from pathlib import Path

    from PIL import Image, ImageDraw

    pred, gt = as_boxes(pred_xyxy, "pred_xyxy"), as_boxes(gt_xyxy, "gt_xyxy")
    n = len(images)
    if not n or len(expressions) != n or len(pred) != n or len(gt) != n:
        raise UserError(f"{n} images, {len(expressions)} expressions, {len(pred)} predicted and {len(gt)} "
                        "ground-truth boxes: give one of each per example", field="images")
    cols, caption_h = min(columns, n), 46
    rows = -(-n // cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, text) in enumerate(zip(images, expressions)):
        im = (Image.open(img) if isinstance(img, (str, Path)) else img).convert("RGB")
        scale = tile / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))))
        x0, y0 = (k % cols) * tile, (k // cols) * (tile + caption_h)
        sheet.paste(im, (x0, y0))
        for box, colour in ((gt[k], (0, 170, 0)), (pred[k], (220, 0, 0))):
            draw.rectangle([x0 + float(v) * scale if i % 2 == 0 else y0 + float(v) * scale
                            for i, v in enumerate(box.tolist())], outline=colour, width=3)
        lines = textwrap.wrap(str(text), width=max(10, tile // 7))[:3]
        draw.multiline_text((x0 + 3, y0 + tile + 2), "\n".join(lines), fill=(0, 0, 0))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
