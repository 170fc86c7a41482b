"""Grounding precision@0.5: IoU exactly 0.5 is a hit, GIoU (MDETR) is stricter, box conversions,
MDETR's P@k, per-split report, brute-force IoU and bad boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mdpd_vl.errors import UserError
from mdpd_vl.eval.grounding import (
    aligned_overlap,
    cxcywh_norm_to_xyxy,
    grounding_report,
    precision_at,
    precision_at_k,
    xywh_to_xyxy,
)


def naive_iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_iou_exactly_half_is_a_hit():
    pred, gt = [[0, 0, 2, 2]], [[0, 0, 2, 1]]  # intersection 2, union 4
    assert float(aligned_overlap(pred, gt)[0]) == 0.5
    assert precision_at(pred, gt) == 100.0
    assert precision_at(pred, gt, kind="giou") == 100.0  # enclosing box == union here


def test_giou_is_stricter_than_iou():
    pred, gt = [[0, 0, 10, 10]], [[1.8, 1.8, 11.8, 11.8]]
    iou = float(aligned_overlap(pred, gt, "iou")[0])
    giou = float(aligned_overlap(pred, gt, "giou")[0])
    assert iou == pytest.approx(67.24 / 132.76)  # 0.5065
    assert giou == pytest.approx(iou - (139.24 - 132.76) / 139.24)  # 0.4599
    assert precision_at(pred, gt, kind="iou") == 100.0
    assert precision_at(pred, gt, kind="giou") == 0.0


def test_conversions():
    assert xywh_to_xyxy([[10, 20, 30, 40]]).tolist() == [[10, 20, 40, 60]]
    # MDETR: normalised cx, cy, w, h scaled by the original (W, H, W, H).
    out = cxcywh_norm_to_xyxy(np.array([[0.5, 0.5, 0.5, 0.25]]), width=640, height=480)
    assert out.tolist() == [[160.0, 180.0, 480.0, 300.0]]
    per_box = cxcywh_norm_to_xyxy(torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 2), [100, 200], [10, 20])
    assert per_box.tolist() == [[0, 0, 100, 10], [0, 0, 200, 20]]


def test_brute_force_iou_and_precision():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (200, 2, 2))
    wh = rng.uniform(1, 50, (200, 2, 2))
    pred = np.concatenate([xy[:, 0], xy[:, 0] + wh[:, 0]], axis=1)
    gt = np.concatenate([xy[:, 1], xy[:, 1] + wh[:, 1]], axis=1)
    ref = np.array([naive_iou(a, b) for a, b in zip(pred, gt)])
    got = aligned_overlap(pred, torch.from_numpy(gt)).numpy()
    assert np.allclose(got, ref)
    assert precision_at(pred, gt, threshold=0.3) == pytest.approx(100 * np.mean(ref >= 0.3))
    assert (aligned_overlap(pred, gt, "giou").numpy() <= got + 1e-12).all()


def test_zero_area_pair_scores_zero_not_nan():
    assert aligned_overlap([[1, 1, 1, 1]], [[1, 1, 1, 1]]).tolist() == [0.0]


def test_precision_at_k_sorts_by_score():
    gt = [[0, 0, 10, 10]]
    boxes = [[[50, 50, 60, 60], [0, 0, 10, 10]]]
    assert precision_at_k(boxes, [[0.9, 0.1]], gt, ks=(1, 2)) == {1: 0.0, 2: 100.0}
    assert precision_at_k(boxes, [[0.1, 0.9]], gt, ks=(1, 2)) == {1: 100.0, 2: 100.0}


def test_report_per_split():
    pred = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    gt = [[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 5]]
    rep = grounding_report(pred, gt, ["refcoco/testA", "refcoco/testA", "refcoco/testB"])
    assert rep["refcoco/testA"]["precision_iou"] == 50.0 and rep["refcoco/testA"]["count"] == 2
    assert rep["refcoco/testA"]["miou"] == 50.0
    assert rep["refcoco/testB"]["precision_giou"] == 100.0
    assert list(rep) == ["refcoco/testA", "refcoco/testB"]


def test_bad_boxes():
    with pytest.raises(UserError, match="box 1 has negative width"):
        xywh_to_xyxy([[0, 0, 1, 1], [0, 0, -1, 1]])
    with pytest.raises(UserError, match="negative height"):
        precision_at([[0, 5, 1, 1]], [[0, 0, 1, 1]])
    with pytest.raises(UserError, match=r"shape \(N, 4\)"):
        precision_at([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(UserError, match="2 predicted boxes but 1"):
        precision_at([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1]])
    with pytest.raises(UserError, match="non-finite"):
        precision_at([[0, 0, float("nan"), 1]], [[0, 0, 1, 1]])
    with pytest.raises(UserError, match="kind"):
        precision_at([[0, 0, 1, 1]], [[0, 0, 1, 1]], kind="dice")
    with pytest.raises(UserError, match="negative width"):
        cxcywh_norm_to_xyxy([[0.5, 0.5, -0.1, 0.1]], 100, 100)
