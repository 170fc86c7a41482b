"""The fading-frontier axes (issue 16) as config values: what the student changes (norms + biases, merged
low-rank deltas), what W_B reads (pooled earlier layers), the last-layer feature distillation and the
side-only warm-up; each validated with the field named and stated by describe_objective."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import BUILDERS, build_tiny_bert, build_tiny_vit, make_input
from test_distill import ce_loss, make_dualpath

from mdpd_vl.distill import DistillConfig
from mdpd_vl.errors import UserError
from mdpd_vl.export import FadedModel, export_faded, is_plain, load_faded
from mdpd_vl.heads.pooling import LayerPoolHead

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value", [
    ("backbone_trainable", "biases"), ("lowrank_r", 0), ("lowrank_alpha", 0.0), ("head_layers", "first"),
    ("head_layers", "last_0"), ("head_layers", [1, 1]), ("feature_logits", -1.0), ("side_warmup_steps", -1),
    ("side_warmup_steps", 1.5),
])
def test_bad_fading_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(UserError, match=field):
        DistillConfig(**{field: value})  # type: ignore[arg-type]


def test_feature_logits_needs_a_trainable_backbone() -> None:
    with pytest.raises(UserError, match="feature_logits.*backbone_trainable=head"):
        DistillConfig(backbone_trainable="head", feature_logits=1e-3)
    DistillConfig(backbone_trainable="norms_all", feature_logits=1e-3)


def test_head_layers_resolve_against_the_backbone() -> None:
    assert DistillConfig(head_layers="last").head_layer_indices(6) == []
    assert DistillConfig(head_layers="last_3").head_layer_indices(6) == [3, 4]
    assert DistillConfig(head_layers="all").head_layer_indices(4) == [0, 1, 2]
    assert DistillConfig(head_layers=[3, 0, 5]).head_layer_indices(6) == [0, 3]  # the last layer is always read
    with pytest.raises(UserError, match="head_layers"):
        DistillConfig(head_layers="last_7").head_layer_indices(6)
    with pytest.raises(UserError, match="head_layers"):
        make_dualpath(build_tiny_vit(), head_layers=[5])


def test_cli_names_the_bad_field_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mdpd_vl.tasks.itr", "--print-config", "-", "--set", "method.distill.head_layers=first"],
        cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "head_layers" in lines[0], proc.stderr


# ----------------------------------------------------------------------------- what trains
def _step(dp, x) -> dict[str, torch.Tensor]:
    """One AdamW step on every group; returns a copy of every parameter before it."""
    before = {n: p.detach().clone() for n, p in dp.named_parameters()}
    opt = torch.optim.AdamW([p for g in dp.param_groups().values() for p in g], lr=1e-2)
    dp.train()
    dp(x, ce_loss(4)).loss.backward()
    opt.step()
    return before


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("choice", ["norms_biases", "lowrank"])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_frozen_tensors_stay_bit_identical(family: str, choice: str, checkpointing: bool) -> None:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    dp = make_dualpath(backbone, backbone_trainable=choice, checkpointing=checkpointing)
    groups = dp.param_groups()
    assert groups[{"norms_biases": "backbone_biases", "lowrank": "backbone_lowrank"}[choice]] or family == "cnn"
    if choice == "lowrank":
        assert groups["backbone_lowrank"] and groups["backbone_norms"] == []
    trained = {id(p) for g in groups.values() for p in g}
    before = _step(dp, make_input(backbone))
    changed = 0
    for name, p in dp.named_parameters():
        if id(p) in trained:
            changed += not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name]), f"frozen {name} moved"
    backbone_trained = [p for k, g in groups.items() if k.startswith("backbone_") and k != "backbone_head" for p in g]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone_trained)
    assert changed > 0


def test_norms_biases_holds_every_block_bias_and_norm_once() -> None:
    from mdpd_vl.tuning.methods import block_biases

    backbone = build_tiny_bert()
    dp = make_dualpath(backbone, backbone_trainable="norms_biases")
    groups = dp.param_groups()
    norms, biases = groups["backbone_norms"], groups["backbone_biases"]
    assert {id(p) for p in norms}.isdisjoint(id(p) for p in biases)
    assert {id(p) for p in block_biases(backbone)} <= {id(p) for p in norms + biases}
    assert {id(p) for _, p in backbone.norm_parameters()} == {id(p) for p in norms}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_lowrank_fades_to_the_bare_architecture(family: str, checkpointing: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    bare_count = sum(p.numel() for p in BUILDERS[family]().parameters())
    backbone = BUILDERS[family]()
    dp = make_dualpath(backbone, backbone_trainable="lowrank", checkpointing=checkpointing)
    x = make_input(backbone)
    _step(dp, x)
    with torch.no_grad():  # LoRA's B starts at zero: make the deltas large enough to matter
        for p in dp.param_groups()["backbone_lowrank"]:
            p.add_(torch.randn_like(p) * 0.1)
    dp.eval()
    faded = dp.fade()
    assert is_plain(faded)
    assert sum(p.numel() for p in faded.backbone.parameters()) == bare_count
    with torch.no_grad():
        unmerged = FadedModel(dp.backbone, dp.head_backbone)(x)
        merged = faded(x)
        bare = FadedModel(BUILDERS[family](), dp.head_backbone).eval()(x)
    assert (merged - unmerged).abs().max() < 1e-5
    assert (merged - bare).abs().max() > 1e-3  # the deltas are in the weights
    with torch.no_grad():  # the deployed copy is independent of the training model
        for p in dp.param_groups()["backbone_lowrank"]:
            p.add_(1.0)
        assert torch.equal(faded(x), merged)
    export_faded(faded, tmp_path / "export")
    with torch.no_grad():
        assert (load_faded(tmp_path / "export")(x) - merged).abs().max() < 1e-5


# ----------------------------------------------------------------------------- what W_B reads
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_multi_layer_head_starts_as_the_paper_head_and_exports(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    dp = make_dualpath(backbone, head_layers="all", backbone_trainable="norms_all")
    head = dp.head_backbone
    assert isinstance(head, LayerPoolHead) and head.layers == list(range(backbone.num_layers - 1))
    x = make_input(backbone)
    dp.eval()
    with torch.no_grad():
        assert torch.equal(dp.fade()(x), FadedModel(backbone, head.head)(x))  # W starts at zero
    _step(dp, x)
    assert head.mix.weight.abs().sum() > 0  # it learns to read the earlier layers
    dp.eval()
    faded = dp.fade()
    export_faded(faded, tmp_path / "export")
    loaded = load_faded(tmp_path / "export")
    assert isinstance(loaded.head, LayerPoolHead)
    with torch.no_grad():
        y = faded(x)
        assert not torch.allclose(y, FadedModel(backbone, head.head)(x))
        assert (loaded(x) - y).abs().max() < 1e-6


# ----------------------------------------------------------------------------- objective switches
def test_feature_logits_teaches_b_last_and_fades_away() -> None:
    torch.manual_seed(0)
    backbone = build_tiny_vit()
    dp = make_dualpath(backbone, backbone_trainable="norms_all", feature_logits=1e-2, logits="none")
    dp.train()
    out = dp(make_input(backbone))  # no task loss: the backbone path learns from the feature term only
    assert "feature_logits" in out.losses and out.losses["feature_logits"] > 0
    out.loss.backward()
    assert dp.feature_student.proj.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dp.param_groups()["backbone_norms"])
    assert all(p.grad is None for p in dp.head_backbone.parameters())  # W_B reads no such term
    ids = {id(p) for p in dp.fade().parameters()}
    assert all(id(p) not in ids for p in dp.feature_student.parameters())
    assert any(p is dp.feature_student.proj.weight for p in dp.param_groups()["distill"])


def test_side_warmup_trains_the_side_path_only_for_its_steps() -> None:
    torch.manual_seed(0)
    backbone = build_tiny_bert()
    dp = make_dualpath(backbone, backbone_trainable="norms_all", side_warmup_steps=2, task_on_backbone=True)
    x = make_input(backbone)
    opt = torch.optim.AdamW([p for g in dp.param_groups().values() for p in g], lr=1e-3)
    dp.train()
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        out = dp(x, ce_loss(4))
        out.loss.backward()
        groups = dp.param_groups()
        warm = step < 2
        assert out.phase == ("side" if warm else "joint")
        assert ("logits" in out.losses) is not warm and ("task_backbone" in out.losses) is not warm
        for name in ("backbone_head", "backbone_norms"):
            assert all((p.grad is None) is warm for p in groups[name]), (step, name)
        assert all(p.grad is not None for p in groups["side"])
        opt.step()


def test_retrieval_adds_no_backbone_term_during_the_warmup() -> None:
    from mdpd_vl.heads.gpo import VSEHead
    from mdpd_vl.heads.retrieval import RetrievalConfig
    from mdpd_vl.tasks.retrieval import DualTowerRetrieval
    from mdpd_vl.tuning import apply_method
    from mdpd_vl.tuning.config import MethodConfig

    torch.manual_seed(0)
    cfg = MethodConfig(d=8, distill=DistillConfig(d=4, backbone_trainable="norms_all", side_warmup_steps=1))
    towers = [apply_method(b(), lambda w: VSEHead(w, 16), cfg) for b in (build_tiny_vit, build_tiny_bert)]
    model = DualTowerRetrieval(*towers, RetrievalConfig())
    model.train()
    images, texts = make_input(towers[0].backbone), make_input(towers[1].backbone)
    assert not {"task_backbone", "cross_relational"} & set(model.losses(images, texts))
    for tower in towers:
        tower.core.after_optimizer_step()
    assert {"task_backbone", "cross_relational"} <= set(model.losses(images, texts))


def test_describe_objective_states_every_axis() -> None:
    from mdpd_vl.heads.retrieval import RetrievalConfig
    from mdpd_vl.tuning import describe_objective
    from mdpd_vl.tuning.config import MethodConfig

    d = DistillConfig(backbone_trainable="lowrank", lowrank_r=4, head_layers="last_2", feature_logits=1e-3,
                      side_warmup_steps=7, checkpointing="every_2")
    text = describe_objective(MethodConfig(distill=d), RetrievalConfig())
    for words in ("low-rank deltas (rank 4", "merged into the weights", "pooled features of the 1 layer(s) before it (head_layers: last_2)",
                  "last-layer feature regression", "first 7 optimiser steps train the side path only",
                  "activation checkpointing (every_2)"):
        assert words in text, words
    text = describe_objective(MethodConfig(distill=DistillConfig(backbone_trainable="norms_biases")), RetrievalConfig())
    assert "every bias inside the backbone blocks" in text and "W_B reads the last layer." in text


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_clone_of_a_checkpointed_backbone_runs_its_own_weights(family: str) -> None:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    backbone.set_checkpointing("all")
    dup = backbone.clone()
    assert dup.checkpointing == backbone.checkpointing
    x = make_input(backbone)
    backbone.eval(), dup.eval()
    with torch.no_grad():
        before = dup.features(x)[-1].clone()
        for p in backbone.parameters():
            p.add_(torch.randn_like(p))
        assert torch.equal(dup.features(x)[-1], before)
    x = make_input(backbone)
    dup.features(x)[-1].sum().backward()  # the copy's own checkpointed blocks run and recompute
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.parametrize("kind", ["vse", "gap"])
def test_folded_multi_layer_head_is_the_same_function(kind: str) -> None:
    from mdpd_vl.heads.gpo import VSEHead
    from mdpd_vl.heads.pooling import GAPLinear

    torch.manual_seed(0)
    widths, embed = [24, 40, 48], 16
    inner = VSEHead(48, embed, token_drop=0.0) if kind == "vse" else GAPLinear(48, embed)
    head = LayerPoolHead(inner, [0, 1], widths[:2], widths[-1])
    with torch.no_grad():
        head.mix.weight.normal_(), head.mix.bias.normal_()  # a trained W, not the zero start
    head.eval()
    feats = [torch.randn(3, 7, w) for w in widths]
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])  # padded text
    folded = head.folded()
    assert folded is not head and folded.after and not folded.training
    assert folded.mix.out_features == embed < head.mix.out_features  # the cheaper map
    with torch.no_grad():
        want = head(feats, mask)
        assert (folded(feats, mask) - want).abs().max() < 1e-4 * want.abs().max()
    assert folded.folded() is folded


def test_a_head_that_cannot_fold_or_gains_nothing_stays_as_it_is() -> None:
    from mdpd_vl.heads.gpo import VSEHead

    with_mlp = LayerPoolHead(VSEHead(48, 16, mlp=True), [0], [24], 48)  # the MLP branch is not affine
    wider = LayerPoolHead(VSEHead(48, 64), [0], [24], 48)  # mapping to 64 instead of 48 costs more
    assert with_mlp.folded() is with_mlp and wider.folded() is wider


# ----------------------------------------------------------------------------- per-tower head_layers
def test_head_layers_per_tower_resolves_for_each_tower() -> None:
    cfg = DistillConfig(head_layers={"text": "last_3"})
    towers = ("image", "text")
    assert cfg.for_tower("text", towers).head_layers == "last_3"
    assert cfg.for_tower("image", towers).head_layers == "last"  # a tower not named reads the last layer
    assert DistillConfig(head_layers="all").for_tower("image", towers).head_layers == "all"
    with pytest.raises(UserError, match="head_layers.*video"):
        DistillConfig(head_layers={"video": "last_2"}).for_tower("image", towers)
    with pytest.raises(UserError, match="head_layers.*'text'"):
        DistillConfig(head_layers={"text": "first"})
    with pytest.raises(UserError, match="head_layers.*named towers"):
        cfg.head_layer_indices(6)  # a task without towers cannot use it


def test_itr_builds_each_tower_with_its_own_head_layers() -> None:
    from mdpd_vl.engine.config import load_config
    from mdpd_vl.tasks.itr import ITRConfig, build_model

    cfg = load_config(ITRConfig, None, ["method.distill.head_layers={text: last_3}", "data.shapes_scale=tiny"])
    model = build_model(cfg)
    image_head, text_head = model.image.core.head_backbone, model.text.core.head_backbone
    assert not isinstance(image_head, LayerPoolHead)
    n = model.text.core.backbone.num_layers
    assert isinstance(text_head, LayerPoolHead) and text_head.layers == [n - 3, n - 2]
