"""The MDETR grounding head alone: sine position encoding, Hungarian matching, set losses and the matched-query
distillation against hand-worked numbers; box conversions to pixels; shapes, aux outputs, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from mdpd_vl.errors import UserError
from mdpd_vl.heads.grounding import (
    BoxScoreHead,
    GroundingConfig,
    GroundingOutput,
    GroundingTransformer,
    positive_map,
    sine_position_embedding,
    top_box,
)
from mdpd_vl.heads.grounding_loss import (
    Targets,
    align_loss,
    box_losses,
    hungarian_match,
    label_loss,
    matched_distillation,
    matched_queries,
    set_losses,
)

TINY = dict(d_model=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=64, num_queries=5, num_tokens=16,
            dropout=0.0)


def test_sine_position_embedding_hand_worked():
    # d_model 4: one sin/cos pair for y, one for x; dim_t = 1; y = 1 / (1 + eps) * 2 pi on a 1-row grid
    pos = sine_position_embedding(1, 2, 4)
    expected = torch.tensor([[math.sin(2 * math.pi), 1.0, math.sin(math.pi), -1.0],
                             [math.sin(2 * math.pi), 1.0, math.sin(2 * math.pi), 1.0]])
    assert torch.allclose(pos, expected, atol=1e-4)


def test_sine_position_embedding_matches_the_formula():
    # DETR/MDETR: channel 2i of y is sin(y / T^(2i/F)), 2i+1 is cos(same); F = d/2; y normalised to (0, 2 pi]
    h, w, d, t = 3, 4, 16, 10000.0
    pos = sine_position_embedding(h, w, d).reshape(h, w, d)
    f = d // 2
    for r in range(h):
        for c in range(w):
            y, x = (r + 1) / (h + 1e-6) * 2 * math.pi, (c + 1) / (w + 1e-6) * 2 * math.pi
            for i in range(f // 2):
                div = t ** (2 * i / f)
                want = [math.sin(y / div), math.cos(y / div)]
                got = pos[r, c, 2 * i: 2 * i + 2].tolist()
                assert got == pytest.approx(want, abs=1e-5)
                got_x = pos[r, c, f + 2 * i: f + 2 * i + 2].tolist()
                assert got_x == pytest.approx([math.sin(x / div), math.cos(x / div)], abs=1e-5)


def _output(boxes, logits) -> GroundingOutput:
    return GroundingOutput(torch.tensor([boxes], dtype=torch.float32), torch.tensor([logits], dtype=torch.float32))


def test_matching_is_optimal_not_greedy():
    # p(query, target tokens): q0 [0.45, 0.40], q1 [0.40, 0.05], q2 [0.10, 0.10]. Greedy takes q0 -> t0 (0.45) and
    # then q2 -> t1 (0.10): 0.55; the optimum is q0 -> t1 + q1 -> t0 = 0.80 (every other pairing is <= 0.55).
    probs = [[0.45, 0.40, 0.15], [0.40, 0.05, 0.55], [0.10, 0.10, 0.80]]
    out = _output([[0.5, 0.5, 0.2, 0.2]] * 3, [[math.log(p) for p in row] for row in probs])
    targets = Targets([torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 2)], [torch.tensor([[1.0, 0.0], [0.0, 1.0]])])
    (rows, cols), = hungarian_match(out, targets, cost_class=1.0, cost_bbox=0.0, cost_giou=0.0)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_matching_box_costs_hand_worked():
    # target (0.5, 0.5, 0.2, 0.2). q0 = (0.5, 0.5, 0.4, 0.4) contains it: L1 0.4, GIoU 0.04 / 0.16 = 0.25.
    # q1 = (0.65, 0.5, 0.2, 0.2): overlap 0.05 x 0.2 = 0.01, union 0.07, hull 0.35 x 0.2 = 0.07 -> GIoU 1/7; L1 0.15.
    out = _output([[0.5, 0.5, 0.4, 0.4], [0.65, 0.5, 0.2, 0.2]], [[0.0, 0.0]] * 2)
    targets = Targets.single(torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([[1.0]]))

    def best(**costs) -> int:
        return int(matched_queries(hungarian_match(out, targets, **costs))[0])

    assert best(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0) == 1
    assert best(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0) == 0
    # MDETR's weights: q0 5 * 0.4 - 2 * 0.25 = 1.5, q1 5 * 0.15 - 2 / 7 = 0.464
    assert best(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0) == 1
    # equal weights: q0 0.4 - 0.25 = 0.15, q1 0.15 - 0.143 = 0.007
    assert best(cost_class=0.0, cost_bbox=1.0, cost_giou=1.0) == 1
    assert best(cost_class=0.0, cost_bbox=1.0, cost_giou=3.0) == 0  # 0.4 - 0.75 < 0.15 - 0.43


def test_label_and_box_losses_hand_worked():
    # logits all 0 over 2 token slots + no-object: -log(1/3) per query; q1 unmatched is weighted eos_coef 0.1
    out = _output([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]], [[0.0, 0.0, 0.0]] * 2)
    targets = Targets.single(torch.tensor([[0.6, 0.5, 0.2, 0.2]]), torch.tensor([[1.0, 0.0]]))
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    assert float(label_loss(out, targets, indices, eos_coef=0.1)) == pytest.approx(1.1 * math.log(3), rel=1e-6)
    l1, giou = box_losses(out, targets, indices)
    # |0.5 - 0.6| = 0.1; overlap 0.1 x 0.2 = 0.02, union 0.06, hull 0.3 x 0.2 = 0.06: GIoU = IoU = 1/3
    assert float(l1) == pytest.approx(0.1, abs=1e-6)
    assert float(giou) == pytest.approx(2 / 3, abs=1e-5)


def test_set_losses_weights_aux_layers_and_match():
    cfg = GroundingConfig(**TINY)
    out = _output([[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]], [[0.0] * 17] * 2)
    out.aux = [_output([[0.6, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]], [[0.0] * 17] * 2)]
    targets = Targets.single(torch.tensor([[0.6, 0.5, 0.2, 0.2]]), positive_map(torch.tensor([[True, True]]), 16))
    losses, indices = set_losses(out, targets, cfg)
    assert sorted(losses) == ["bbox", "bbox_0", "ce", "ce_0", "giou", "giou_0"]
    assert float(losses["bbox"]) == pytest.approx(5 * 0.1, abs=1e-5)  # bbox_coef 5
    assert float(losses["bbox_0"]) == pytest.approx(0.0, abs=1e-6)  # the aux layer is exact
    assert float(losses["giou"]) == pytest.approx(2 * 2 / 3, abs=1e-4)
    assert matched_queries(indices).tolist() == [0]


def test_positive_map_normalised_and_truncated():
    pm = positive_map(torch.tensor([[True, True, False, False], [False, True, True, True]]), 3)
    assert pm.shape == (2, 3)
    assert pm[0].tolist() == pytest.approx([0.5, 0.5, 0.0], abs=1e-5)
    assert pm[1].tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-5)  # token 3 has no slot


def test_top_box_in_pixels():
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.2, 0.4]]])
    logits = torch.tensor([[[0.0, 0.0, 3.0], [2.0, 0.0, -3.0]]])  # query 1 has the lower no-object probability
    xyxy, score = top_box(GroundingOutput(boxes, logits), torch.tensor([[100, 200]]))  # height 100, width 200
    assert xyxy.tolist() == [pytest.approx([80.0, 30.0, 120.0, 70.0])]
    p = torch.softmax(logits[0, 1], -1)
    assert float(score[0]) == pytest.approx(float(1 - p[-1]))


def test_matched_distillation_hand_worked():
    cfg = GroundingConfig(**TINY)
    teacher = _output([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.2, 0.2]], [[1.0, 0.0], [0.0, 2.0]])
    student = _output([[0.6, 0.5, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]])
    t_q, s_q = torch.tensor([1]), torch.tensor([0])
    mse = matched_distillation(teacher, t_q, student, s_q, cfg, "mse")
    assert float(mse) == pytest.approx(0.1 ** 2 + 0.0 + 1.0)  # box (0.1)^2, logits (0-0)^2 + (2-1)^2
    match = matched_distillation(teacher, t_q, student, s_q, cfg, "match")
    p = torch.softmax(torch.tensor([0.0, 2.0]), -1)
    ce = -(p * torch.log_softmax(torch.tensor([0.0, 1.0]), -1)).sum()
    assert float(match) == pytest.approx(5 * 0.1 + 2 * (2 / 3) + float(ce), abs=1e-4)
    teacher.boxes.requires_grad_(True)
    student.boxes.requires_grad_(True)
    matched_distillation(teacher, t_q, student, s_q, cfg, "match").backward()
    assert teacher.boxes.grad is None and student.boxes.grad is not None  # the teacher is detached


def test_transformer_shapes_aux_and_alignment():
    torch.manual_seed(0)
    cfg = GroundingConfig(**TINY, contrastive_align=True)
    model = GroundingTransformer(24, 20, cfg)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, 4:] = False
    out = model(torch.randn(3, 6, 24), (2, 3), torch.randn(3, 6, 20), valid)
    assert out.boxes.shape == (3, 5, 4) and out.logits.shape == (3, 5, 17) and len(out.aux) == 1
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.proj_tokens.shape == (3, 6, cfg.contrastive_hdim)
    targets = Targets.single(torch.rand(3, 4) * 0.5 + 0.25, positive_map(valid, 16), valid)
    losses, indices = set_losses(out, targets, cfg)
    assert "align" in losses and torch.isfinite(torch.stack(list(losses.values()))).all()
    assert float(align_loss(out, targets, indices, cfg.temperature).detach()) > 0
    model.eval()
    assert model(torch.randn(3, 6, 24), (2, 3), torch.randn(3, 6, 20), valid).aux == []  # aux only in training
    with pytest.raises(ValueError, match="grid"):
        model(torch.randn(3, 6, 24), (2, 2), torch.randn(3, 6, 20), valid)


def test_padding_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    model = GroundingTransformer(8, 8, GroundingConfig(**TINY)).eval()
    img, txt = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    padded = torch.cat([txt, torch.randn(1, 2, 8)], dim=1)
    valid = torch.tensor([[True, True, True, False, False]])
    a, b = model(img, (2, 2), txt, None), model(img, (2, 2), padded, valid)
    assert torch.allclose(a.boxes, b.boxes, atol=1e-5) and torch.allclose(a.logits, b.logits, atol=1e-5)


def test_box_score_head_packs_and_unpacks():
    head = BoxScoreHead(12, 7)
    tokens = torch.randn(2, 5, 12)
    out = BoxScoreHead.unpack(head(tokens))
    ref = head.predict(tokens)
    assert torch.equal(out.boxes, ref.boxes) and torch.equal(out.logits, ref.logits)
    assert head.spec()["kwargs"] == {"in_width": 12, "num_tokens": 7, "hidden": 12}


@pytest.mark.parametrize("field,value", [("d_model", 30), ("nheads", 3), ("num_queries", 0), ("dropout", 1.0),
                                         ("eos_coef", -1.0), ("temperature", 0.0)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(UserError, match=field):
        GroundingConfig(**{**TINY, field: value})
    with pytest.raises(UserError, match="unknown"):
        GroundingConfig.from_dict({"d_modle": 8})
