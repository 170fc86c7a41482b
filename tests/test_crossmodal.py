"""The CLIP-ViL single-stream backbone, its connector and answer head, the VQA / GQA losses and targets,
the question sets (missing images, answers outside the vocabulary) and both prediction formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from vqa_helpers import questions_of, shapes_world, tiny_crossmodal, word_tokenizer

from mdpd_vl.backbones import build_backbone
from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import (
    REAL_VOCABS,
    VOCAB_DIR,
    GQADataset,
    VQADataset,
    build_answer_vocab,
    label_to_answer,
    load_index,
    real_answer_vocab,
)
from mdpd_vl.data.prep.vqav2 import soft_score
from mdpd_vl.errors import UserError
from mdpd_vl.eval import gqa as gqa_eval
from mdpd_vl.eval import vqa as vqa_eval
from mdpd_vl.eval.__main__ import main as eval_main
from mdpd_vl.export import build_head, head_spec
from mdpd_vl.heads.crossmodal import (
    AnswerHead,
    GridPositionEmbedding,
    answer_kl,
    gqa_bce,
    gqa_ce,
    vqa_bce,
)

FIXTURES = Path(__file__).parent / "fixtures" / "real"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_world(tmp_path_factory.mktemp("vqa_world"))


# -- backbone and connector ------------------------------------------------------------------------
@pytest.mark.parametrize("tower", ["cnn", "vit"])
def test_connector_and_layers_are_read_from_the_model(tower: str) -> None:
    bb = tiny_crossmodal(tower)
    spec = bb.image.layer_specs[-1]
    text_width = bb.text.model.config.hidden_size
    assert bb.connector.proj.in_features == spec.width and bb.connector.proj.out_features == text_width
    assert bb.connector.norm.eps == 1e-12 and bb.connector.prefix == spec.prefix
    if tower == "cnn":  # a CNN map: CLIP-ViL's 2-D position tables, in the visual feature width
        assert spec.prefix == 0 and bb.max_grid == max(spec.grid)
        assert bb.connector.position.rows.weight.shape == (max(spec.grid), spec.width)
    else:  # ViT tokens carry their own positions (class token first): none added
        assert spec.prefix == 1 and bb.connector.position is None and bb.max_grid is None
    assert bb.num_layers == bb.text.model.config.num_hidden_layers
    assert bb.widths == [text_width] * bb.num_layers and all(s.grid is None for s in bb.layer_specs)
    x = bb.example_input(3)
    n_visual = bb.image.features(x["images"])[-1].shape[1]
    feats = bb.features(x)
    assert [f.shape for f in feats] == [(3, x["input_ids"].shape[1] + n_visual, text_width)] * bb.num_layers
    assert bb.num_visual_tokens(x) == n_visual
    mask = bb.padding_mask(x)
    assert torch.equal(mask, torch.cat([x["attention_mask"].bool(), torch.ones(3, n_visual, dtype=torch.bool)], 1))


def test_position_embedding_is_rows_plus_columns_row_major() -> None:
    pos = GridPositionEmbedding(width=2, max_grid=3)
    with torch.no_grad():
        pos.rows.weight.copy_(torch.tensor([[1.0, 0], [2, 0], [3, 0]]))
        pos.cols.weight.copy_(torch.tensor([[0, 10.0], [0, 20], [0, 30]]))
    out = pos(torch.zeros(1, 6, 2), (2, 3))[0]  # h = 2 rows, w = 3 columns, flattened row-major
    assert out.tolist() == [[1, 10], [1, 20], [1, 30], [2, 10], [2, 20], [2, 30]]
    with pytest.raises(ValueError, match="max_grid"):
        pos(torch.zeros(1, 8, 2), (2, 4))


def test_padding_text_tokens_change_nothing() -> None:
    torch.manual_seed(0)
    bb = tiny_crossmodal("cnn").eval()
    head = AnswerHead(bb.widths[-1], 7).eval()
    mean_head = AnswerHead(bb.widths[-1], 7, pooling="mean").eval()
    images = bb.image.example_input(2)
    ids = torch.randint(4, 40, (2, 5))
    short = {"images": images, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pad = torch.randint(4, 40, (2, 3))  # whatever sits under a 0 in the mask must not matter
    long = {"images": images, "input_ids": torch.cat([ids, pad], 1),
            "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)}
    with torch.no_grad():
        fs, fl = bb.features(short), bb.features(long)
        ms, ml = bb.padding_mask(short), bb.padding_mask(long)
        assert ml.sum() == ms.sum() and not ml[:, 5:8].any() and ml[:, 8:].all()
        for a, b in zip(fs, fl):
            assert torch.allclose(a, b[ml].view(a.shape), atol=1e-5)  # the valid tokens, in order
        for h in (head, mean_head):
            assert torch.allclose(h(fs[-1], ms), h(fl[-1], ml), atol=1e-5)


def test_frozen_image_backbone_stays_in_eval_mode_and_rebuilds_from_spec() -> None:
    bb = tiny_crossmodal("cnn")
    bb.requires_grad_(False)
    bb.train()
    assert not bb.image.training and bb.connector.training and bb.text.training
    bb.image.requires_grad_(True)
    assert bb.train().image.training  # an image backbone that trains follows the mode
    rebuilt = build_backbone(json.loads(json.dumps(bb.spec())))
    rebuilt.load_state_dict(bb.state_dict())
    x = bb.example_input(2)
    bb.eval(), rebuilt.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(bb.features(x), rebuilt.features(x)))


def test_precomputed_grid_equals_live_images() -> None:
    bb = tiny_crossmodal("cnn").eval()
    x = bb.example_input(2)
    with torch.no_grad():
        grid, hw = bb.visual_tokens(x)
        cached = {"grid": grid, "input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
        assert hw == bb.image.layer_specs[-1].grid
        assert torch.equal(bb.features(x)[-1], bb.features(cached)[-1])
        assert torch.equal(bb.padding_mask(x), bb.padding_mask(cached))


# -- head and losses ---------------------------------------------------------------------------------
def test_answer_head_is_lxmerts_mlp_and_exports() -> None:
    torch.manual_seed(0)
    head = AnswerHead(16, 5)
    lin1, act, norm, lin2 = head.mlp
    assert (lin1.in_features, lin1.out_features, lin2.in_features, lin2.out_features) == (16, 32, 32, 5)
    assert isinstance(act, nn.GELU) and act.approximate == "none" and norm.eps == 1e-12
    assert torch.count_nonzero(lin1.bias) == 0 and abs(lin1.weight.std().item() - 0.02) < 0.005
    tokens = torch.randn(3, 4, 16)
    assert torch.equal(head(tokens), head.mlp(tokens[:, 0]))  # the first ([CLS]) token
    rebuilt = build_head(head_spec(head))
    rebuilt.load_state_dict(head.state_dict())
    assert torch.equal(rebuilt(tokens), head(tokens))


def test_vqa_bce_against_hand_worked_values() -> None:
    # zero logits: every answer costs log 2, summed over the answers, mean over the batch
    assert math.isclose(vqa_bce(torch.zeros(2, 4), torch.zeros(2, 4)).item(), 4 * math.log(2), rel_tol=1e-6)
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    target = torch.tensor([[1.0, 0.3, 0.6]])
    sig = torch.sigmoid(logits)[0]
    by_hand = -sum(t * math.log(s) + (1 - t) * math.log(1 - s) for t, s in zip(target[0].tolist(), sig.tolist()))
    assert math.isclose(vqa_bce(logits, target).item(), by_hand, rel_tol=1e-6)
    # LXMERT: BCEWithLogitsLoss()(logit, target) * logit.size(1)
    lxmert = nn.BCEWithLogitsLoss()(logits, target) * logits.size(1)
    assert math.isclose(vqa_bce(logits, target).item(), lxmert.item(), rel_tol=1e-6)


def test_gqa_losses_and_answers_outside_the_vocabulary() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    label = torch.tensor([2, -1, 0])
    ce = gqa_ce(logits, label)
    assert torch.isclose(ce, nn.functional.cross_entropy(logits[[0, 2]], label[[0, 2]]))
    ce.backward()
    assert torch.count_nonzero(logits.grad[1]) == 0  # the question outside the vocabulary teaches nothing
    none = gqa_ce(logits, torch.full((3,), -1))
    assert none.item() == 0 and none.requires_grad
    onehot = torch.zeros(3, 4)
    onehot[0, 2] = onehot[2, 0] = 1
    assert torch.isclose(gqa_bce(logits, label), vqa_bce(logits, onehot))


def test_answer_kl() -> None:
    a = torch.randn(4, 6)
    assert answer_kl(a, a).abs().item() < 1e-6
    b = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    p = torch.softmax(teacher / 2, -1)
    by_hand = (p * (torch.log(p) - torch.log_softmax(b / 2, -1))).sum(-1).mean() * 4
    loss = answer_kl(teacher, b, temperature=2.0)
    assert torch.isclose(loss, by_hand)
    loss.backward()
    assert teacher.grad is None and b.grad is not None  # the teacher is detached


# -- targets -----------------------------------------------------------------------------------------
def _records(answers: list[str]) -> list[dict]:
    return [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(answers)]


@pytest.mark.parametrize(("matches", "score"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_scores_are_the_official_leave_one_out_accuracy(matches: int, score: float) -> None:
    # by hand: each of the 10 leave-one-out subsets scores min(1, matches left / 3)
    by_hand = (matches * min(1, (matches - 1) / 3) + (10 - matches) * min(1, matches / 3)) / 10 if matches else 0.0
    assert soft_score(matches) == pytest.approx(score) == pytest.approx(by_hand, abs=1e-4)
    raw = _records(["red"] * matches + [f"other{i}" for i in range(10 - matches)])
    assert vqa_eval.question_accuracy("red", raw) == pytest.approx(score)


def test_dataset_targets_match_the_official_metric(world: Path) -> None:
    vocab = build_answer_vocab([load_index(world / "vqa" / "train.index.json")])
    ds = VQADataset(world / "vqa" / "train.index.json", None, vocab)
    answers = label_to_answer(vocab)
    for i in range(len(ds)):
        item = ds.items[i]
        target = ds[i]["target"]
        for label in torch.nonzero(target).flatten().tolist():
            # the soft score a training target holds is what the official metric gives that answer
            assert target[label].item() == pytest.approx(vqa_eval.question_accuracy(answers[label], item["raw_answers"]),
                                                         abs=1e-4)


# -- question sets -----------------------------------------------------------------------------------
def test_questions_with_missing_images_are_skipped_and_counted(world: Path, tmp_path: Path) -> None:
    for task, cls in (("vqa", VQADataset), ("gqa", GQADataset)):
        index = load_index(world / task / "train.index.json")
        gone = index["items"][0]["image"]
        n_gone = sum(it["image"] == gone for it in index["items"])
        index["items"] = [{**it, "image": "nowhere/" + it["image"]} if it["image"] == gone else it
                          for it in index["items"]]
        with pytest.warns(UserWarning, match=f"{n_gone} question"):
            ds = cls(index, None, {})
        assert ds.missing_images == n_gone and len(ds) == len(index["items"]) - n_gone
        assert ds.counts()["missing_images"] == n_gone and all(it["image"] != "nowhere/" + gone for it in ds.items)


def test_answers_outside_the_vocabulary_are_counted(world: Path) -> None:
    train = load_index(world / "vqa" / "train.index.json")
    vocab = build_answer_vocab([train])
    keep = dict(list(vocab.items())[:3])  # a vocabulary that misses most answers
    keep = {a: i for i, a in enumerate(keep)}
    ds = VQADataset(train, None, keep)
    outside = sum(1 for it in train["items"] for a, s in it["answers"].items() if s > 0 and a not in keep)
    none_left = sum(1 for it in train["items"] if not any(a in keep for a in it["answers"]))
    assert ds.oov_answers == outside > 0 and ds.unanswerable == none_left > 0
    empty = next(i for i, it in enumerate(ds.items) if not any(a in keep for a in it["answers"]))
    assert ds[empty]["target"].sum() == 0  # kept, with an all-zero target (LXMERT)

    gtrain = load_index(world / "gqa" / "train.index.json")
    gvocab = {a: i for i, a in enumerate(list(build_answer_vocab([gtrain]))[:2])}
    g = GQADataset(gtrain, None, gvocab)
    assert g.oov_answers == sum(it["answer"] not in gvocab for it in gtrain["items"]) > 0
    labels = [g[i]["label"] for i in range(len(g))]
    assert labels.count(-1) == g.oov_answers


def test_shipped_vocabularies() -> None:
    vqa, gqa = real_answer_vocab("vqav2"), real_answer_vocab("gqa")
    assert len(vqa) == 3129 and len(gqa) == 1842 and vqa[""] == 0  # CLIP-ViL's: index 0 is ""
    assert sorted(vqa.values()) == list(range(3129)) and sorted(gqa.values()) == list(range(1842))
    with pytest.raises(UserError, match="valid: vqav2, gqa"):
        real_answer_vocab("coco")
    for name in REAL_VOCABS.values():
        fixture = FIXTURES / name
        if not fixture.is_file():
            pytest.skip(f"{fixture} not in this checkout yet")
        assert (VOCAB_DIR / name).read_bytes() == fixture.read_bytes()


def test_collated_question_batches(world: Path) -> None:
    tok = word_tokenizer(questions_of(world))
    bb = tiny_crossmodal("cnn", tok)
    vocab = build_answer_vocab([load_index(world / "vqa" / "train.index.json")])
    ds = VQADataset(world / "vqa" / "train.index.json", bb.transform(False), vocab)
    batch = Collator(bb.tokenize, text_key="question")([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 64, 64) and batch["target"].shape == (4, len(vocab))
    ids = batch["text"]["input_ids"]
    assert (ids[:, 0] == tok.cls_token_id).all() and ids.shape[1] <= bb.max_length
    with torch.no_grad():
        feats = bb.eval().features(bb.inputs(batch["image"], batch["text"]))
    assert feats[-1].shape[1] == ids.shape[1] + 4  # question tokens + the 2x2 grid


# -- prediction files --------------------------------------------------------------------------------
def test_prediction_files_in_both_official_formats(world: Path, tmp_path: Path) -> None:
    vqa_items = load_index(world / "vqa" / "val.index.json")["items"]
    qids = [it["question_id"] for it in vqa_items]
    answers = [next(iter(it["answers"]), "yes") for it in vqa_items]
    vqa_eval.write_predictions(tmp_path / "vqa.json", qids, answers)
    records = json.loads((tmp_path / "vqa.json").read_text())
    assert records[0] == {"question_id": qids[0], "answer": answers[0]} and isinstance(records[0]["question_id"], int)
    assert vqa_eval.read_predictions(tmp_path / "vqa.json") == {str(q): a for q, a in zip(qids, answers)}
    assert eval_main(["vqa", str(tmp_path / "vqa.json"), str(world / "vqa" / "val.index.json")]) == 0

    gqa_items = load_index(world / "gqa" / "testdev.index.json")["items"]
    gids = [it["question_id"] for it in gqa_items]
    gqa_eval.write_predictions(tmp_path / "gqa.json", gids, [it["answer"] for it in gqa_items])
    grecords = json.loads((tmp_path / "gqa.json").read_text())
    assert set(grecords[0]) == {"questionId", "prediction"}
    assert eval_main(["gqa", str(tmp_path / "gqa.json"), str(world / "gqa" / "testdev.index.json")]) == 0
    with pytest.raises(UserError, match="appears twice"):
        gqa_eval.write_predictions(tmp_path / "bad.json", gids[:1] * 2, ["no", "no"])
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("task", ["vqa", "gqa"])
@pytest.mark.parametrize("problem", ["unknown", "duplicate"])
def test_bad_prediction_files_are_one_line_and_exit_2(world: Path, tmp_path: Path, task: str, problem: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    split = "val" if task == "vqa" else "testdev"
    items = load_index(world / task / f"{split}.index.json")["items"]
    key, value = ("question_id", "answer") if task == "vqa" else ("questionId", "prediction")
    records = [{key: it["question_id"], value: "no"} for it in items]
    records.append({key: 987654321 if task == "vqa" else "987654321", value: "no"} if problem == "unknown"
                   else records[0])
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(records))
    with pytest.raises(SystemExit) as exit_info:
        eval_main([task, str(path), str(world / task / f"{split}.index.json")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and str(path) in err
    assert ("appears twice" if problem == "duplicate" else "not in the") in err
    reader = vqa_eval.read_predictions if task == "vqa" else gqa_eval.read_predictions
    if problem == "duplicate":
        with pytest.raises(UserError, match="appears twice"):
            reader(path)


def test_norms_and_checkpointing_are_the_encoders() -> None:
    bb = tiny_crossmodal("cnn")
    norms = bb.norm_parameters()
    encoder_norms = [p for layer in bb.blocks for m in layer.modules() if isinstance(m, nn.LayerNorm)
                     for p in m.parameters()]
    assert [id(p) for _, p in norms] == [id(p) for p in encoder_norms] and len(norms) == 2 * 2 * bb.num_layers
    assert not any(n.startswith(("image.", "connector.")) for n, _ in norms)
    bb.eval()
    x = bb.example_input(2)
    bb.connector.requires_grad_(True)
    plain = bb.features(x)[-1]
    (g_plain,) = torch.autograd.grad(plain.sum(), [bb.connector.proj.weight])
    bb.set_checkpointing(True)
    ckpt = bb.features(x)[-1]
    (g_ckpt,) = torch.autograd.grad(ckpt.sum(), [bb.connector.proj.weight])
    assert torch.allclose(plain, ckpt) and torch.allclose(g_plain, g_ckpt, atol=1e-6)
