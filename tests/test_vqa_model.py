"""The VQA task model on every tuning method: a few steps on tiny shapes VQA / GQA batches with the loss
falling, frozen tensors bit-identical, the connector's trainability per method, MDPD's answer
distillation, the faded model without side modules, the connector alignment stage and `answer()`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from vqa_helpers import questions_of, shapes_world, snapshot, tiny_crossmodal, word_tokenizer

from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import GQADataset, VQADataset, build_answer_vocab, label_to_answer, load_index
from mdpd_vl.distill.losses import logits_mse
from mdpd_vl.engine.memory import measure_train_state
from mdpd_vl.export import FadedModel
from mdpd_vl.heads.crossmodal import AnswerHead, answer_kl
from mdpd_vl.side.base import SideNetwork
from mdpd_vl.tasks.vqa_model import (
    ConnectorAlignment,
    VQAConfig,
    VQAModel,
    answer_head_factory,
    batch_inputs,
    build_vqa_model,
)
from mdpd_vl.tuning import MethodConfig, apply_method

METHODS: dict[str, dict[str, Any]] = {
    "linear": {},
    "partial": {},
    "lora": {"lora_r": 2},
    "adapter": {"adapter_dim": 4},
    "unipt": {},
    "sherl": {},
    "lst": {},
    "mdpd": {"distill": {"d": 4, "backbone_trainable": "head"}},
    "mdpd_norms": {"distill": {"d": 4, "backbone_trainable": "norms_all", "checkpointing": True}},
}
IN_GRAPH = {"partial", "lora", "adapter", "mdpd_norms"}  # methods whose backward reaches block 1


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_world(tmp_path_factory.mktemp("vqa_model_world"))


@pytest.fixture(scope="module")
def tokenizer(world: Path) -> Any:
    return word_tokenizer(questions_of(world))


def method_config(key: str) -> MethodConfig:
    name = "mdpd" if key.startswith("mdpd") else key
    return MethodConfig(name=name, **METHODS[key])


def task_batch(world: Path, backbone: Any, task: str, n: int = 8) -> tuple[dict[str, Any], list[str]]:
    """The first `n` training questions of the tiny shapes world, collated; vocabulary from train."""
    index = load_index(world / task / "train.index.json")
    vocab = build_answer_vocab([index])
    cls = VQADataset if task == "vqa" else GQADataset
    ds = cls(index, backbone.transform(False), vocab)
    return Collator(backbone.tokenize, text_key="question")([ds[i] for i in range(n)]), label_to_answer(vocab)


def build(world: Path, tokenizer: Any, key: str, task: str, **cfg: Any) -> tuple[VQAModel, dict[str, Any]]:
    backbone = tiny_crossmodal("cnn", tokenizer)
    batch, answers = task_batch(world, backbone, task)
    torch.manual_seed(0)
    return build_vqa_model(backbone, method_config(key), answers, VQAConfig(task=task, **cfg)), batch


@pytest.mark.parametrize("task", ["vqa", "gqa"])
@pytest.mark.parametrize("key", list(METHODS))
def test_steps_lower_the_loss_and_leave_frozen_tensors_bit_identical(world: Path, tokenizer: Any, key: str,
                                                                     task: str) -> None:
    model, batch = build(world, tokenizer, key, task)
    groups = model.param_groups()
    trained = {id(p) for g in groups.values() for p in g}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trained), name
    names = {id(p): n for n, p in model.named_parameters()}
    before = snapshot(model)
    opt = torch.optim.AdamW([{"params": g} for g in groups.values() if g], lr=1e-2, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(3):
        loss = sum(model.losses(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    after = snapshot(model)
    trained_names = {f"param:{names[i]}" for i in trained}
    for key_, value in before.items():
        if key_ not in trained_names:  # frozen: every parameter outside the groups, every buffer
            assert torch.equal(value, after[key_]), key_
    assert any(not torch.equal(before[k], after[k]) for k in trained_names)


@pytest.mark.parametrize("key", list(METHODS))
def test_connector_trains_only_where_the_graph_reaches_the_first_block(world: Path, tokenizer: Any,
                                                                       key: str) -> None:
    model, _ = build(world, tokenizer, key, "vqa")
    conn = model.backbone.connector
    group = model.param_groups()["connector"]
    if key in IN_GRAPH:  # CLIP-ViL trains visn_fc (Linear + LayerNorm) there; visual_pos stays frozen
        assert {id(p) for p in group} == {id(p) for p in conn.projection_parameters()}
        assert not any(p.requires_grad for p in conn.position.parameters())
    else:
        assert group == [] and not any(p.requires_grad for p in conn.parameters())
    assert not any(p.requires_grad for p in model.backbone.image.parameters())


def test_faded_model_has_no_side_module_and_equals_the_backbone_path(world: Path, tokenizer: Any) -> None:
    model, batch = build(world, tokenizer, "mdpd", "vqa")
    faded = model.deployed()
    assert isinstance(faded, FadedModel) and isinstance(faded.head, AnswerHead)
    assert not any(isinstance(m, SideNetwork) for m in faded.modules())
    assert set(dict(faded.named_children())) == {"backbone", "head"}
    n_params = sum(p.numel() for p in faded.parameters())
    assert n_params == sum(p.numel() for p in model.backbone.parameters()) + sum(
        p.numel() for p in model.tuned.core.head_backbone.parameters())
    x = batch_inputs(batch)
    model.eval()
    with torch.no_grad():
        out = model.tuned.core(x)
        assert torch.equal(faded(x), out.y_backbone)
        assert torch.equal(model.deployed(side_kept=True)(x), out.y_side)
    with pytest.raises(ValueError, match="mdpd only"):
        build(world, tokenizer, "lora", "vqa")[0].deployed(side_kept=True)


@pytest.mark.parametrize("objective", ["kl", "mse"])
def test_mdpd_answer_distillation_terms(world: Path, tokenizer: Any, objective: str) -> None:
    model, batch = build(world, tokenizer, "mdpd", "vqa", logits=objective, temperature=2.0)
    model.train()
    core = model.tuned.core
    torch.manual_seed(1)
    losses = model.losses(batch)
    assert {"task", "task_backbone", "logits", "shallow", "deep"} <= set(losses)
    core.step -= 1  # replay the same step (the mask depends on it) to recompute the two outputs
    out = core(batch_inputs(batch))
    expected = answer_kl(out.y_side, out.y_backbone, 2.0) if objective == "kl" else \
        1e-4 * logits_mse(out.y_side, out.y_backbone)
    assert torch.allclose(losses["logits"], expected)
    assert core.cfg.logits_weight == 0 and not core.cfg.task_on_backbone  # DualPath's own terms are off
    # the teacher is detached: the logits term sends no gradient to the side path
    side = [p for p in core.side.parameters()]
    grads = torch.autograd.grad(losses["logits"], side, allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    # building MDPD directly (DualPath computing its own logits term) is refused
    tuned = apply_method(tiny_crossmodal("cnn", tokenizer), answer_head_factory(5), MethodConfig(distill={"d": 4}))
    with pytest.raises(ValueError, match="build_vqa_model"):
        VQAModel(tuned, ["a"] * 5, VQAConfig())


def test_connector_alignment_trains_the_connector_through_the_frozen_encoder(world: Path, tokenizer: Any) -> None:
    backbone = tiny_crossmodal("cnn", tokenizer)
    batch, answers = task_batch(world, backbone, "vqa")
    align = ConnectorAlignment(backbone, len(answers))
    groups = align.param_groups()
    assert {id(p) for p in groups["connector"]} == {id(p) for p in backbone.connector.parameters()}
    before = snapshot(backbone)
    opt = torch.optim.AdamW([{"params": g} for g in groups.values()], lr=1e-2)
    align.train()
    assert not backbone.text.training and backbone.connector.training
    losses = []
    for _ in range(3):
        loss = align.losses(batch)["task"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = snapshot(backbone)
    for k, v in before.items():
        assert torch.equal(v, after[k]) != k.startswith("param:connector."), k


def test_training_the_connector_in_mdpd_head_would_outweigh_the_whole_step(world: Path, tokenizer: Any) -> None:
    """The measurement behind the decision: MDPD `head` with a frozen connector vs the extra graph a
    connector trained through the encoder would add (what `ConnectorAlignment` back-propagates)."""
    model, batch = build(world, tokenizer, "mdpd", "vqa")
    params = [p for g in model.param_groups().values() for p in g]
    model.train()
    mdpd = measure_train_state(model, lambda: sum(model.losses(batch).values()), params,
                               torch.optim.AdamW(params, lr=1e-3))
    align = ConnectorAlignment(model.backbone, len(model.answers))
    align.train()
    conn = list(model.backbone.connector.parameters())
    through = measure_train_state(align, lambda: align.losses(batch)["task"], conn, torch.optim.AdamW(conn, lr=1e-3))
    assert through["saved_bytes"] > mdpd["saved_bytes"]


def test_answer_returns_vocabulary_strings(world: Path, tokenizer: Any) -> None:
    from PIL import Image

    model, batch = build(world, tokenizer, "mdpd", "gqa")
    items = load_index(world / "gqa" / "val.index.json")
    root = Path(items["media_root"])
    images = [Image.open(root / it["image"]).convert("RGB") for it in items["items"][:3]]
    questions = [it["question"] for it in items["items"][:3]]
    for side_kept in (False, True):
        qa = model.answerer(side_kept)
        got = qa.answer(images, questions)
        logits = qa.logits(images, questions)
        assert got == [model.answers[i] for i in logits.argmax(-1).tolist()] and len(got) == 3
        assert all(a in model.answers for a in got)
    with pytest.raises(ValueError, match="2 images but 3 questions"):
        model.answerer().answer(images[:2], questions)


@pytest.mark.parametrize("key", ["mdpd", "partial"])
def test_deployed_model_exports_and_reloads_with_identical_answers(world: Path, tokenizer: Any, key: str,
                                                                   tmp_path: Path) -> None:
    from mdpd_vl.export import export_faded, load_exported

    model, batch = build(world, tokenizer, key, "vqa")
    deployed = model.deployed().eval()
    export_faded(deployed, tmp_path / "export")
    reloaded = load_exported(tmp_path / "export")
    x = batch_inputs(batch)
    with torch.no_grad():  # (LoRA exports once merged: the task kit's job)
        assert torch.equal(reloaded(x), deployed(x))
    assert not any(isinstance(m, SideNetwork) for m in reloaded.modules())


@pytest.mark.parametrize("key", ["adapter", "unipt"])
def test_models_an_export_cannot_rebuild_are_not_exported(world: Path, tokenizer: Any, key: str) -> None:
    """Houlsby adapters (ours, not peft's) and side-kept networks are not in the backbone's spec: a
    reloaded export would lack them, so the deployed answerer says it is not exportable."""
    model, _ = build(world, tokenizer, key, "vqa")
    qa = model.answerer()
    assert not qa.exportable()
    with pytest.raises(TypeError, match="plain backbone"):
        qa.export_parts(Path("unused"))
