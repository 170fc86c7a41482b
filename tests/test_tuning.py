"""Every tuning method on the three backbone families: one training step, frozen tensors stay
bit-identical, and trainable / inference counts equal counts computed here from the architecture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BERT_CFG, BUILDERS, VIT_CFG, make_input
from torch import nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.distill import Bottleneck, GenerationBlock
from mdpd_vl.errors import UserError
from mdpd_vl.heads.pooling import GAPLinear
from mdpd_vl.side import build_side
from mdpd_vl.tuning import METHODS, MethodConfig, apply_method

CLASSES = 5
LORA_R, ADAPTER_DIM, D = 2, 4, 4
ALL_METHODS = ["linear", "full", "partial", "bitfit", "lora", "adalora", "ia3", "adapter", "unipt", "sherl", "lst",
               "mdpd"]
ADALORA_R = LORA_R + 4  # AdaLoRA's initial rank: lora_r + 4 by default
PEFT = {"total_step": 4}  # AdaLoRA needs the run's optimiser steps


def peft_for(method: str) -> dict:
    return dict(PEFT)  # shared by the peft methods: IA3 leaves AdaLoRA's total_step out


def head(width: int) -> int:
    return (width + 1) * CLASSES


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def transformer_dims(family: str) -> tuple[int, int, int]:
    """(layers, width D, MLP width H) from the test configs."""
    if family == "vit":
        return VIT_CFG["layers"], VIT_CFG["width"], int(VIT_CFG["width"] * VIT_CFG["mlp_ratio"])
    return BERT_CFG["num_hidden_layers"], BERT_CFG["hidden_size"], BERT_CFG["intermediate_size"]


def cnn_modules(backbone: Backbone, kind: type) -> list[nn.Module]:
    return [m for block in backbone.blocks for m in block.modules() if isinstance(m, kind)]


def expected_counts(family: str, method: str, backbone: Backbone, cfg: MethodConfig) -> tuple[int, int]:
    """(trainable, inference) parameter counts, from the architecture, computed before the method."""
    total = numel(backbone)
    out = head(backbone.widths[-1])
    if family != "cnn":
        layers, width, mlp = transformer_dims(family)
        norms = layers * 2 * 2 * width  # two LayerNorms (scale + shift) per block
        biases = layers * (7 * width + mlp)
        if family == "vit":  # packed q/k/v (in_proj) + c_fc + c_proj
            lora = layers * LORA_R * ((width + 3 * width) + (width + mlp) + (mlp + width))
        else:  # query, key, value, attention output + intermediate + output
            lora = layers * LORA_R * (4 * 2 * width + (width + mlp) + (mlp + width))
        adapters = layers * 2 * (2 * width * ADAPTER_DIM + ADAPTER_DIM + width)
        # IA3: one vector per Linear outside attention modules (width of its output; of its input for
        # the MLP's narrowing layer); AdaLoRA: A, B and the singular values E on the same Linears
        if family == "vit":  # c_fc + c_proj (open_clip's packed attention is a parameter, not a module)
            ia3 = layers * 2 * mlp
            adalora = layers * 2 * ADALORA_R * (width + mlp + 1)
        else:  # query, key, value, attention output + intermediate + output
            ia3 = layers * (4 * width + 2 * mlp)
            adalora = layers * ADALORA_R * (4 * (2 * width + 1) + 2 * (width + mlp + 1))
    else:
        bns = cnn_modules(backbone, nn.BatchNorm2d)
        convs = [c for c in cnn_modules(backbone, nn.Conv2d) if c.groups == 1]
        norms = sum(2 * m.num_features for m in bns)
        biases = sum(m.num_features for m in bns)  # timm ResNet convs have no bias
        assert all(c.bias is None for c in convs)
        lora = sum(LORA_R * (c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels) for c in convs)
        ia3 = sum(c.out_channels for c in convs)
        adalora = sum(ADALORA_R * (c.in_channels * c.kernel_size[0] * c.kernel_size[1] + c.out_channels + 1)
                      for c in convs)
        adapters = 0
        for stage, spec in zip(backbone.blocks, backbone.layer_specs):
            a = min(ADAPTER_DIM, spec.width)
            adapters += len(stage) * (2 * spec.width * a + a + spec.width)
    if method in ("unipt", "sherl", "lst", "mdpd"):
        name = method if method != "mdpd" else cfg.side_network
        torch.manual_seed(0)
        side = build_side(name, backbone.layer_specs, cfg.side_config(), backbone=backbone)
        side_params = numel(side) + head(side.out_width)
        if method != "mdpd":
            return side_params, total + side_params
        layers_n = backbone.num_layers
        n_shallow = layers_n // 2
        distill = sum(Bottleneck.num_params(side.layer_widths[i], D, backbone.widths[i]) for i in range(layers_n))
        deep = range(n_shallow, layers_n)
        distill += sum(
            GenerationBlock.num_params(backbone.widths[i], D, text=backbone.layer_specs[i].grid is None)
            for i in deep
        )
        distill += sum({backbone.widths[i] for i in deep})  # one mask token per deep width
        return side_params + distill + out + norms, total + out
    table = {
        "linear": (out, total + out),
        "full": (total + out, total + out),
        "partial": (norms + out, total + out),
        "bitfit": (biases + out, total + out),
        "lora": (lora + out, total + out),  # deployed merged: the bare backbone's count
        "adalora": (adalora + out, total + out),
        "ia3": (ia3 + out, total + out),
        "adapter": (adapters + out, total + adapters + out),
    }
    return table[method]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_trains_only_its_parameters_with_analytic_counts(method: str, family: str) -> None:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    cfg = MethodConfig(name=method, lora_r=LORA_R, adapter_dim=ADAPTER_DIM, distill={"d": D}, peft=peft_for(method))
    trainable, inference = expected_counts(family, method, backbone, cfg)
    torch.manual_seed(0)
    tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), cfg)
    assert tuned.trainable_params == trainable
    assert tuned.inference_params == inference

    groups = tuned.param_groups()
    trained = {id(p) for g in groups.values() for p in g}
    for name, p in tuned.named_parameters():
        assert p.requires_grad == (id(p) in trained), name
    names = {id(p): n for n, p in tuned.named_parameters()}
    before = snapshot(tuned)
    opt = torch.optim.AdamW(tuned.optimizer_groups(), lr=1e-2, weight_decay=0.1)
    tuned.train()
    x = make_input(backbone)
    labels = torch.arange(4) % CLASSES
    for _ in range(2):  # two steps: LoRA's A only moves once B is non-zero
        opt.zero_grad(set_to_none=True)
        _, losses = tuned.train_forward(x, lambda y: F.cross_entropy(y, labels))
        sum(losses.values()).backward()
        opt.step()
    after = snapshot(tuned)
    trained_names = {f"param:{names[i]}" for i in trained}
    frozen = [k for k in before if k not in trained_names]
    changed = [k for k in frozen if not torch.equal(before[k], after[k])]
    if method == "full":  # BatchNorm statistics (and the step counters) of full fine-tuning may move
        changed = [k for k in changed if not k.startswith("buffer:")]
    # buffers of trained modules (a side network's own BatchNorm statistics) may move as well
    owners = {n.rpartition(".")[0] for i in trained for n in [names[i]]}
    changed = [k for k in changed if not (k.startswith("buffer:") and k[7:].rpartition(".")[0] in owners)]
    assert changed == [], changed
    moved = [k for k in trained_names if not torch.equal(before[k], after[k])]
    assert moved, "nothing trained"
    head_names = [f"param:{names[id(p)]}" for g in ("head", "side_head") for p in groups.get(g, [])]
    assert all(k in moved for k in head_names)


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "adapter"])
@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_lora_and_adapter_start_as_the_plain_backbone(method: str, family: str) -> None:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    x = make_input(backbone)
    backbone.eval()
    with torch.no_grad():
        ref = backbone.features(x)[-1]
    tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), MethodConfig(name=method, lora_r=2, peft=peft_for(method)))
    tuned.eval()
    with torch.no_grad():
        assert torch.allclose(tuned.backbone.features(x)[-1], ref, atol=1e-5)


def _perturb(module: nn.Module) -> None:
    """Move every peft delta away from its identity start, as training would."""
    from mdpd_vl.tuning.lora import adapter_parameters

    with torch.no_grad():
        for p in adapter_parameters(module):
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_peft_methods_deploy_merged_as_the_bare_architecture(method: str, family: str) -> None:
    torch.manual_seed(0)
    bare = numel(BUILDERS[family]())
    backbone = BUILDERS[family]()
    tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), MethodConfig(name=method, lora_r=2, peft=peft_for(method)))
    _perturb(tuned.backbone)
    tuned.eval()
    x = make_input(backbone)
    with torch.no_grad():
        ref = tuned.model(x)
    deployed = tuned.deployed().eval()
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert type(deployed).__name__ == "FadedModel"
    assert not any(isinstance(m, BaseTunerLayer) for m in deployed.modules())
    assert numel(deployed) == bare + head(backbone.widths[-1]) == tuned.inference_params
    with torch.no_grad():
        assert torch.allclose(deployed(x), ref, atol=1e-5)
    # the tuned model is untouched: still unmerged, and it trains on
    assert any(isinstance(m, BaseTunerLayer) and not m.merged for m in tuned.modules())
    tuned.train()
    opt = torch.optim.SGD(tuned.optimizer_groups(), lr=0.1)
    _, losses = tuned.train_forward(x, lambda y: F.cross_entropy(y, torch.arange(4) % CLASSES))
    sum(losses.values()).backward()
    opt.step()
    tuned.eval()
    with torch.no_grad():
        assert not torch.allclose(tuned.model(x), ref) and torch.allclose(deployed(x), ref, atol=1e-5)


def test_adapter_is_served_unmerged_and_says_so() -> None:
    tuned = apply_method(BUILDERS["vit"](), lambda w: GAPLinear(w, CLASSES), MethodConfig(name="adapter"))
    assert tuned.deployed() is tuned.model and "cannot fold" in tuned.deployment
    assert "merged" in apply_method(BUILDERS["vit"](), lambda w: GAPLinear(w, 2), MethodConfig(name="lora")).deployment


def test_adalora_regularises_and_reallocates_ranks_once_per_optimiser_step() -> None:
    torch.manual_seed(0)
    backbone = BUILDERS["bert"]()
    cfg = MethodConfig(name="adalora", lora_r=2, peft={"total_step": 6, "tinit": 1, "tfinal": 1, "deltaT": 1})
    tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), cfg)
    tuned.train()
    x, labels = make_input(backbone), torch.arange(4) % CLASSES
    opt = torch.optim.AdamW(tuned.optimizer_groups(), lr=1e-2)
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        _, losses = tuned.train_forward(x, lambda y: F.cross_entropy(y, labels))
        assert "orth_reg" in losses and losses["orth_reg"] > 0
        sum(losses.values()).backward()
        opt.step()
    assert tuned.optimizer_steps == 6
    singular = [p for n, p in tuned.backbone.named_parameters() if "lora_E" in n]
    kept = sum(int((p != 0).sum()) for p in singular)
    assert kept == 2 * len(singular)  # the budget fell from init_r (6) to target_r (2) per matrix
    with pytest.raises(UserError, match=r"method\.peft.*total_step"):
        apply_method(BUILDERS["bert"](), lambda w: GAPLinear(w, 2), MethodConfig(name="adalora"))
    with pytest.raises(UserError, match=r"method\.peft: unknown peft config key\(s\) totl_step"):
        apply_method(BUILDERS["bert"](), lambda w: GAPLinear(w, 2), MethodConfig(name="ia3", peft={"totl_step": 3}))


@pytest.mark.parametrize("mode", ["eval", "bn_eval"])
def test_every_method_runs_its_frozen_backbone_in_the_one_configured_mode(mode: str) -> None:
    for method in [m for m in ALL_METHODS if m != "full"]:
        backbone = BUILDERS["bert"]()
        cfg = MethodConfig(name=method, backbone_mode=mode, distill={"d": 4}, peft=peft_for(method))
        tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), cfg).train()
        assert tuned.backbone_mode == mode, method
        dropout = [m for m in backbone.modules() if isinstance(m, nn.Dropout)]
        assert dropout and all(m.training == (mode == "bn_eval") for m in dropout), method
    tuned = apply_method(BUILDERS["cnn"](), lambda w: GAPLinear(w, 2), MethodConfig(name="partial", backbone_mode=mode))
    tuned.train()
    assert not any(m.training for m in tuned.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    full = apply_method(BUILDERS["cnn"](), lambda w: GAPLinear(w, 2), MethodConfig(name="full", backbone_mode=mode))
    assert full.backbone_mode == "train"


def test_linear_and_side_kept_run_the_backbone_without_grad() -> None:
    for method in ("linear", "unipt"):
        backbone = BUILDERS["vit"]()
        tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), MethodConfig(name=method))
        tuned.train()
        y, _ = tuned.train_forward(make_input(backbone))
        y.sum().backward()
        assert all(p.grad is None for p in backbone.parameters())
        assert not any(m.training for m in backbone.modules())


def test_mdpd_deploys_the_faded_model() -> None:
    backbone = BUILDERS["bert"]()
    tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), MethodConfig(name="mdpd", distill={"d": 4}))
    deployed = tuned.deployed().eval()
    tuned.eval()
    x = make_input(backbone)
    with torch.no_grad():
        assert torch.allclose(deployed(x), tuned.core(x).y_backbone, atol=1e-6)
    assert [g["name"] for g in tuned.optimizer_groups({"backbone_norms": 1e-3})] == [
        "side", "distill", "side_head", "backbone_head", "backbone_norms"
    ]


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="name.*unknown tuning method 'prompt'.*adapter, bitfit"):
        MethodConfig(name="prompt")
    assert METHODS.names() == sorted(ALL_METHODS)
    cfg = MethodConfig()
    cfg.name = "prompt"
    with pytest.raises(UserError, match="method.name"):
        apply_method(BUILDERS["cnn"](), lambda w: GAPLinear(w, 2), cfg)


def test_method_config_loads_with_overrides_and_names_bad_fields(tmp_path) -> None:
    from mdpd_vl.engine.config import load_config

    cfg = load_config(MethodConfig, overrides=["name=lora", "lora_r=4", "distill.logits=relational"])
    assert cfg.name == "lora" and cfg.lora_r == 4 and cfg.distill.logits == "relational"
    with pytest.raises(UserError, match=r"distill\.mask_ratio"):
        load_config(MethodConfig, overrides=["distill.mask_ratio=1.5"])
    with pytest.raises(UserError, match="lora_r"):
        load_config(MethodConfig, overrides=["lora_r=0"])


def test_backbone_without_layers_is_refused() -> None:
    class NoLayers(Backbone):
        pass

    with pytest.raises(UserError, match="backbone.*no layers"):
        apply_method(NoLayers(), lambda w: GAPLinear(w, 2), MethodConfig(name="linear"))


def test_describe_objective_states_the_objective_in_words() -> None:
    from mdpd_vl.heads.retrieval import RetrievalConfig
    from mdpd_vl.tuning import describe_objective

    # the ITR default: logits mse AND the VSE loss on the backbone path, both stated, no contradiction
    text = describe_objective(MethodConfig(distill={"backbone_trainable": "head"}), RetrievalConfig())
    assert "VSE hinge triplet loss" in text and "on the side path and on the backbone path" in text
    assert "cross-modal relational KL" in text and "weight 1," in text and "logits MSE" in text
    assert "only the backbone head W_B" in text and "eval mode" in text and "faded" in text
    off = describe_objective(MethodConfig(distill={"logits": "none", "ema_teacher": 0.99}),
                             RetrievalConfig(backbone_task=False, cross_relational=0.0))
    assert "the backbone path gets no task loss" in off and "no distillation term" in off
    ema = describe_objective(MethodConfig(distill={"ema_teacher": 0.9}), {"task_loss": "cross-entropy"})
    assert "EMA copy of the side path (decay 0.9" in ema and "cross-entropy on the side path (weight 1)" in ema
    assert "merged into the weights" in describe_objective(MethodConfig(name="lora"))
    assert "cannot merge" in describe_objective(MethodConfig(name="adapter"))
    assert "bn_eval" in describe_objective(MethodConfig(name="partial", backbone_mode="bn_eval"))


def test_tuning_readme_lists_exactly_the_registered_methods() -> None:
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "mdpd_vl" / "tuning" / "README.md").read_text()
    table = text[text.index("| method | trains |"):].split("\n\n")[0]
    listed = {name for row in table.splitlines()[2:] for name in re.findall(r"`([a-z0-9]+)`", row.split("|")[1])}
    assert listed == set(METHODS.names())
