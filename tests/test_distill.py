"""Dual-path distillation: losses, masks, generation block, DualPath on the three backbone families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, build_tiny_bert, build_tiny_vit, make_input
from torch import nn

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.distill import Bottleneck, DistillConfig, DualPath, GenerationBlock, draw_token_mask
from mdpd_vl.distill.losses import imitation_loss, logits_mse, masked_generation_loss, relational_kl
from mdpd_vl.engine.memory import SavedTensorsMeter
from mdpd_vl.errors import UserError
from mdpd_vl.heads.pooling import GAPLinear
from mdpd_vl.side import build_side

CLASSES = 5


def make_dualpath(backbone: Backbone, side: str = "unipt", **cfg: object) -> DualPath:
    torch.manual_seed(1)
    net = build_side(side, backbone.layer_specs, {"r": 2}, backbone=backbone)
    cfg.setdefault("d", 4)
    return DualPath(
        backbone, net, GAPLinear(net.out_width, CLASSES), GAPLinear(backbone.widths[-1], CLASSES),
        DistillConfig(**cfg),  # type: ignore[arg-type]
    )


def ce_loss(batch: int):
    labels = torch.arange(batch) % CLASSES
    return lambda y: F.cross_entropy(y, labels)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_mask_ratio_outside_unit_interval_names_the_field(ratio: float) -> None:
    with pytest.raises(UserError, match="mask_ratio"):
        DistillConfig(mask_ratio=ratio)


@pytest.mark.parametrize(
    "field,value",
    [("logits", "cosine"), ("backbone_trainable", "all"), ("schedule", "random"), ("split", 2.0),
     ("feature_layers", "some"), ("ema_teacher", 1.0), ("deep_weight", -1.0), ("d", 0)],
)
def test_bad_config_fields_are_named(field: str, value: object) -> None:
    with pytest.raises(UserError, match=field):
        DistillConfig(**{field: value})


def test_config_loads_through_the_engine_with_the_section_named(tmp_path) -> None:
    from mdpd_vl.engine.config import load_config

    cfg = load_config(DistillConfig, overrides=["logits=relational", "feature_layers=[0, 1]"])
    assert cfg.logits == "relational" and cfg.feature_layers == [0, 1]
    path = tmp_path / "d.yaml"
    path.write_text("mask_ratio: 1.0\n")
    with pytest.raises(UserError, match=r"d\.yaml.*mask_ratio"):
        load_config(DistillConfig, path)


# ----------------------------------------------------------------------------- building blocks


def test_bottleneck_has_the_papers_parameter_count() -> None:
    d_s, d, d_b = 24, 5, 40
    phi = Bottleneck(d_s, d, d_b)
    assert sum(p.numel() for p in phi.parameters()) == (1 + d_s + d_b) * d + d_b
    assert phi(torch.randn(2, 7, d_s)).shape == (2, 7, d_b)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.0])
def test_mask_ratio_matches_lambda_and_is_reproducible(ratio: float) -> None:
    m = draw_token_mask(64, 257, ratio, torch.Generator().manual_seed(3), prefix=1)
    assert not m[:, 0].any()  # the class token is never masked
    assert abs(m[:, 1:].float().mean().item() - ratio) < 0.02
    again = draw_token_mask(64, 257, ratio, torch.Generator().manual_seed(3), prefix=1)
    assert torch.equal(m, again)
    other = draw_token_mask(64, 257, ratio, torch.Generator().manual_seed(4), prefix=1)
    assert ratio == 0.0 or not torch.equal(m, other)


def test_deep_loss_ignores_unmasked_and_padding_tokens() -> None:
    torch.manual_seed(0)
    b, g = torch.randn(3, 10, 6), torch.randn(3, 10, 6)
    mask = torch.rand(3, 10) < 0.5
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[2, 6:] = False
    loss = masked_generation_loss(b, g, mask, valid)
    g2 = g.clone()
    g2[~mask] += 100.0  # unmasked positions
    g2[~valid] -= 50.0  # padding
    assert torch.equal(masked_generation_loss(b, g2, mask, valid), loss)
    g3 = g.clone()
    g3[mask & valid] += 1.0
    assert not torch.allclose(masked_generation_loss(b, g3, mask, valid), loss)
    # the pinned reduction: sum over masked valid tokens and channels, mean over the batch
    expected = ((b - g).pow(2) * (mask & valid).unsqueeze(-1)).sum() / 3
    assert torch.allclose(loss, expected)


def test_imitation_and_logits_losses_reduce_by_sum_then_batch_mean_and_detach_teachers() -> None:
    teacher = torch.ones(2, 3, 4, requires_grad=True)
    student = torch.zeros(2, 3, 4, requires_grad=True)
    loss = imitation_loss(teacher, student)
    assert loss.item() == pytest.approx(3 * 4)  # 24 squared errors of 1, over a batch of 2
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    ys = torch.randn(4, 5, requires_grad=True)
    yb = torch.randn(4, 5, requires_grad=True)
    mse = logits_mse(ys, yb)
    assert torch.allclose(mse, (ys - yb).pow(2).sum() / 4)
    mse.backward()
    assert ys.grad is None
    with pytest.raises(ValueError, match="equal output shapes"):
        logits_mse(torch.randn(4, 5), torch.randn(4, 6))


def test_relational_kl_is_zero_on_agreement_and_takes_any_widths() -> None:
    torch.manual_seed(0)
    ys = torch.randn(6, 8, requires_grad=True)
    assert relational_kl(ys, ys.detach().clone() * 3.0, 0.1).abs().item() < 1e-6  # scale-free
    yb = torch.randn(6, 11, requires_grad=True)
    loss = relational_kl(ys, yb, 0.1)
    assert loss.item() > 0
    loss.backward()
    assert ys.grad is None and yb.grad is not None


def test_generation_block_layouts_and_prefix_path() -> None:
    torch.manual_seed(0)
    vit = GenerationBlock(LayerSpec(8, (4, 4), prefix=1), hidden=3)
    x = torch.randn(2, 17, 8)
    out = vit(x)
    assert out.shape == x.shape
    # the class token takes the centre taps of the same convs (a 3x3 conv on an isolated token)
    cls = x[:, :1].transpose(1, 2).unsqueeze(-1)  # B x D x 1 x 1
    ref = vit.conv2(F.relu(vit.conv1(cls))).flatten(2).transpose(1, 2)
    assert torch.allclose(out[:, :1], ref, atol=1e-6)
    # grid tokens only see a 5x5 neighbourhood (two 3x3 convs): changing a corner leaves far tokens
    x2 = x.clone()
    x2[:, 1] += 1.0  # grid (0, 0)
    diff = (vit(x2) - out).abs().sum(-1)[:, 1:].reshape(2, 4, 4)
    assert diff[:, 3, 3].max() == 0 and diff[:, 0, 0].min() > 0
    text = GenerationBlock(LayerSpec(8), hidden=3)
    assert text(torch.randn(2, 9, 8)).shape == (2, 9, 8)
    counts = {GenerationBlock.num_params(8, 3, text=False), GenerationBlock.num_params(8, 3, text=True)}
    assert counts == {sum(p.numel() for p in vit.parameters()), sum(p.numel() for p in text.parameters())}


# ----------------------------------------------------------------------------- DualPath


@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_deep_loss_unchanged_by_generated_features_at_unmasked_positions(family: str) -> None:
    backbone = BUILDERS[family]()
    # every layer generates; G's full output (the reference path: the hooks below see G.forward)
    dp = make_dualpath(backbone, split=0.0, backbone_trainable="head", deep_outputs="all", fold_up=False)
    dp.eval()  # the step counter (and so the mask) stays put between the passes
    x = make_input(backbone)
    base = dp(x).losses["deep"]
    masks = dict(dp.last_masks)
    # the masks are one per sample, shared by all deep layers with the same token count
    by_len: dict[int, torch.Tensor] = {}
    for m in masks.values():
        assert by_len.setdefault(m.shape[1], m) is m
    assert abs(torch.cat([m.flatten() for m in by_len.values()]).float().mean().item() - 0.5) < 0.2

    def perturb(index: int):
        def hook(_module: nn.Module, _inp: object, out: torch.Tensor) -> torch.Tensor:
            return torch.where(masks[index].unsqueeze(-1), out, out + 7.0)

        return hook

    handles = [dp.generators[str(i)].register_forward_hook(perturb(i)) for i in dp.deep_layers]
    assert torch.equal(dp(x).losses["deep"], base)
    for h in handles:
        h.remove()
    handles = [
        dp.generators[str(i)].register_forward_hook(lambda _m, _i, out: out + 7.0) for i in dp.deep_layers
    ]
    assert not torch.allclose(dp(x).losses["deep"], base)
    for h in handles:
        h.remove()


@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_training_step_losses_groups_and_fade(family: str) -> None:
    backbone = BUILDERS[family]()
    dp = make_dualpath(backbone)
    dp.train()
    x = make_input(backbone)
    out = dp(x, ce_loss(4))
    assert set(out.losses) == {"task_side", "shallow", "deep", "logits"}
    assert torch.allclose(out.loss, sum(out.losses.values()))
    out.loss.backward()
    groups = dp.param_groups()
    assert set(groups) == {"side", "distill", "side_head", "backbone_head", "backbone_norms"}
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))  # disjoint
    for name, params in groups.items():
        assert params and all(p.requires_grad for p in params), name
    grouped = set(ids)
    for name, p in dp.named_parameters():
        assert p.requires_grad == (id(p) in grouped), name
    assert any(p.grad is not None for p in groups["backbone_norms"])  # norms_all: logits reach the norms
    # backbone BatchNorm / dropout stay in eval mode while training
    assert not any(m.training for m in backbone.modules())
    assert dp.step == 1

    dp.eval()
    with torch.no_grad():
        y_b = dp(x).y_backbone
        faded = dp.fade().eval()
        assert torch.allclose(faded(x), y_b, atol=1e-6)
    faded_ids = {id(t) for t in faded.parameters()}
    for name in ("side", "distill", "side_head"):
        assert not faded_ids & {id(p) for p in groups[name]}, name
    assert all(k.startswith(("backbone.", "head.")) for k in faded.state_dict())
    n_backbone = sum(p.numel() for p in backbone.parameters())
    assert sum(p.numel() for p in faded.parameters()) == n_backbone + (backbone.widths[-1] + 1) * CLASSES


def _backbone_saved_bytes(dp: DualPath, x: object) -> tuple[int, int]:
    """(bytes saved for backward while the backbone ran, bytes of the whole forward)."""
    params = list(dp.parameters())
    inner: list[int] = []
    run = dp.backbone.features

    def metered(inp: object, **kwargs: object) -> list[torch.Tensor]:
        with SavedTensorsMeter(exclude=params) as meter:  # innermost hooks win while the backbone runs
            feats = run(inp, **kwargs)
        inner.append(meter.bytes)
        return feats

    dp.backbone.features = metered  # type: ignore[method-assign]
    try:
        with SavedTensorsMeter(exclude=params) as total:
            out = dp(x, ce_loss(4))
        out.loss.backward()
    finally:
        del dp.backbone.features
    return inner[0], total.bytes


def test_head_only_saves_nothing_in_the_backbone_and_no_grad_reaches_it() -> None:
    saved = {}
    for layers in (2, 4):
        for mode, extra in (("head", {}), ("norms_all", {}), ("norms_last_k", {"last_k": 1}),
                            ("ckpt", {"checkpointing": True})):
            backbone = build_tiny_vit(layers)
            trainable = "norms_all" if mode == "ckpt" else mode
            dp = make_dualpath(backbone, backbone_trainable=trainable, **extra)
            dp.train()
            x = make_input(backbone)
            saved[mode, layers] = _backbone_saved_bytes(dp, x)[0]
            if mode == "head":
                assert all(p.grad is None for p in backbone.parameters())
                assert dp.param_groups()["backbone_norms"] == []
    assert saved["head", 2] == saved["head", 4] == 0
    assert saved["norms_all", 4] > saved["norms_all", 2] > 0  # the bill the head mode avoids
    assert saved["norms_last_k", 4] == saved["norms_last_k", 2] < saved["norms_all", 2]
    assert saved["ckpt", 4] < saved["norms_all", 4]


def test_alternate_schedule_leaves_the_other_groups_gradients_none() -> None:
    backbone = build_tiny_vit()
    dp = make_dualpath(backbone, schedule="alternate")
    dp.train()
    x = make_input(backbone)
    opt = torch.optim.SGD([p for g in dp.param_groups().values() for p in g], lr=0.0)
    for step, (active, idle) in enumerate([("side", "backbone"), ("backbone", "side")]):
        opt.zero_grad(set_to_none=True)
        out = dp(x, ce_loss(4))
        expected = {"task_side", "shallow", "deep"} if active == "side" else {"logits"}
        assert set(out.losses) == expected, step
        out.loss.backward()
        groups = dp.param_groups()
        side_groups = groups["side"] + groups["distill"] + groups["side_head"]
        backbone_groups = groups["backbone_head"] + groups["backbone_norms"]
        live, frozen = (side_groups, backbone_groups) if active == "side" else (backbone_groups, side_groups)
        assert all(p.grad is None for p in frozen), idle
        assert any(p.grad is not None for p in live), active
        opt.step()  # the phase advances per optimiser step, never per forward
    assert dp.optimizer_steps == 2 and dp.phases == ("side", "backbone")


def test_alternate_with_grad_accum_gives_one_phase_per_optimiser_step(tmp_path) -> None:
    from mdpd_vl.engine.config import TrainConfig
    from mdpd_vl.engine.train import train

    backbone = build_tiny_vit()
    dp = make_dualpath(backbone, schedule="alternate", backbone_trainable="head")
    images = make_input(backbone, batch=16)
    data = torch.utils.data.TensorDataset(images, torch.arange(16) % CLASSES)
    seen: list[tuple[int, tuple[str, ...]]] = []

    def step_fn(model: DualPath, batch, step: int) -> dict[str, torch.Tensor]:
        x, y = batch
        out = model(x, lambda logits: F.cross_entropy(logits, y))
        seen.append((step, tuple(sorted(out.losses))))
        return {"loss": out.loss}

    groups = [{"name": k, "params": v} for k, v in dp.param_groups().items() if v]
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=4, lr=1e-3, log_every=1, ckpt_every=0)
    train(dp, step_fn, data, lambda items: tuple(torch.utils.data.default_collate(items)), groups, cfg,
          tmp_path / "run")
    assert [s for s, _ in seen] == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 micro-batches per optimiser step
    side, bb = ("deep", "shallow", "task_side"), ("logits",)
    assert [losses for _, losses in seen] == [side, side, bb, bb, side, side, bb, bb]
    assert dp.optimizer_steps == 4 and dp.step == 8


def test_task_on_backbone_relational_and_ema_teacher() -> None:
    backbone = build_tiny_bert()
    net = build_side("unipt", backbone.layer_specs, {"r": 2}, backbone=backbone)
    cfg = DistillConfig(d=4, logits="relational", task_on_backbone=True, ema_teacher=0.5, temperature=0.5)
    # relational distillation works across different output widths
    dp = DualPath(backbone, net, GAPLinear(net.out_width, 7), GAPLinear(backbone.widths[-1], 7), cfg)
    dp.train()
    x = make_input(backbone)
    labels = torch.tensor([0, 1, 2, 3])
    out = dp(x, lambda y: F.cross_entropy(y, labels))
    assert set(out.losses) == {"task_side", "task_backbone", "shallow", "deep", "logits"}
    ema_ids = {id(b) for b in dp.ema.buffers()}
    assert not ema_ids & {id(p) for g in dp.param_groups().values() for p in g}
    before = [b.clone() for b in dp.ema.buffers()]
    opt = torch.optim.SGD([p for g in dp.param_groups().values() for p in g], lr=0.5)
    out.loss.backward()
    dp(x, lambda y: F.cross_entropy(y, labels))  # a forward (a second micro-batch) does not move the EMA
    assert all(torch.equal(a, b) for a, b in zip(before, dp.ema.buffers()))
    opt.step()  # the optimiser step does: halfway towards the live side path
    live = dict(dp.side.named_parameters())
    for i, name in enumerate(dp.ema.names["side"]):
        ema = dp.ema.get_buffer(f"side{i}")
        assert torch.allclose(ema, (before[i] + live[name].detach()) / 2, atol=1e-6), name
    assert any(not torch.equal(a, b) for a, b in zip(before, dp.ema.buffers()))
    # every side-to-backbone term learns from the teacher the config names: the EMA copy, not y_side
    out = dp(x, lambda y: F.cross_entropy(y, labels))
    with torch.no_grad():
        feats = backbone.features(x, with_input=True)
        want = dp.ema(dp.side, dp.head_side, feats[1:], backbone.padding_mask(x), feats[0])
    assert torch.allclose(out.y_teacher, want, atol=1e-6) and not torch.allclose(out.y_teacher, out.y_side)
    assert out.y_teacher.grad_fn is None
    assert torch.allclose(out.losses["logits"], cfg.logits_weight * relational_kl(want, out.y_backbone, 0.5))


def test_without_ema_the_teacher_is_the_detached_side_output() -> None:
    backbone = build_tiny_vit()
    dp = make_dualpath(backbone)
    out = dp(make_input(backbone), ce_loss(4))
    assert torch.equal(out.y_teacher, out.y_side.detach()) and out.y_teacher.grad_fn is None


def test_cross_modal_relational_term_uses_the_ema_teacher() -> None:
    try:  # DualTowerRetrieval is moving from heads/ to the task layer
        from mdpd_vl.tasks.retrieval import DualTowerRetrieval, RetrievalConfig
    except ImportError:
        from mdpd_vl.heads.retrieval import DualTowerRetrieval, RetrievalConfig
    from mdpd_vl.heads.retrieval import relational_kl_2d
    from mdpd_vl.tuning import MdpdTuned

    towers = []
    for build in (build_tiny_vit, build_tiny_bert):
        backbone = build()
        net = build_side("unipt", backbone.layer_specs, {"r": 2}, backbone=backbone)
        cfg = DistillConfig(d=4, ema_teacher=0.9, logits="none", backbone_trainable="head")
        towers.append(MdpdTuned(DualPath(backbone, net, GAPLinear(net.out_width, 6),
                                         GAPLinear(backbone.widths[-1], 6), cfg)))
    model = DualTowerRetrieval(towers[0], towers[1], RetrievalConfig(backbone_task=False))
    with torch.no_grad():  # move the live side heads away from their EMA copies
        for t in towers:
            t.core.head_side.fc.weight.add_(0.5)
    images, texts = make_input(towers[0].backbone), make_input(towers[1].backbone)
    losses = model.losses(images, texts)
    oi, ot = towers[0].core(images), towers[1].core(texts)
    sim = lambda a, b: F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()  # noqa: E731
    want = relational_kl_2d(sim(oi.y_teacher, ot.y_teacher), sim(oi.y_backbone, ot.y_backbone), 0.05)
    live = relational_kl_2d(sim(oi.y_side, ot.y_side), sim(oi.y_backbone, ot.y_backbone), 0.05)
    assert torch.allclose(losses["cross_relational"], want, atol=1e-6)
    assert not torch.allclose(want, live)


def test_step_counter_resumes_with_the_state_dict() -> None:
    backbone = build_tiny_vit()
    dp = make_dualpath(backbone, backbone_trainable="head")
    dp.train()
    x = make_input(backbone)
    for _ in range(3):
        dp(x)
    state = dp.state_dict()
    dp2 = make_dualpath(build_tiny_vit(), backbone_trainable="head")
    dp2.load_state_dict(state)
    assert dp2.step == 3 and dp2.optimizer_steps == dp.optimizer_steps == 0
    dp.eval(), dp2.eval()
    dp(x), dp2(x)
    assert all(torch.equal(dp.last_masks[i], dp2.last_masks[i]) for i in dp.deep_layers)


# ----------------------------------------------------------------------------- bad input


class _NoLayers(Backbone):
    """A backbone whose wrapper found no blocks (never probed)."""


def test_bad_input_is_one_clear_error_naming_the_field() -> None:
    backbone = build_tiny_vit()
    net = build_side("unipt", backbone.layer_specs, {"r": 2})
    heads = (GAPLinear(net.out_width, 3), GAPLinear(backbone.widths[-1], 3))
    with pytest.raises(UserError, match="backbone.*no layers"):
        DualPath(_NoLayers(), net, *heads, DistillConfig(d=4))
    with pytest.raises(UserError, match=r"distill\.d.*exceeds"):
        DualPath(backbone, net, *heads, DistillConfig(d=64))
    with pytest.raises(UserError, match=r"distill\.feature_layers"):
        DualPath(backbone, net, *heads, DistillConfig(d=4, feature_layers=[0, 9]))
    with pytest.raises(UserError, match=r"distill\.last_k"):
        DualPath(backbone, net, *heads, DistillConfig(d=4, backbone_trainable="norms_last_k", last_k=5))
    with pytest.raises(UserError, match="mask_ratio"):
        DistillConfig(mask_ratio=1.0)
