"""The cost cuts of the dual path (issue 17): each option computes what it says, and the exact ones change
nothing but the bill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, build_tiny_vit, make_input

from mdpd_vl.backbones.base import LayerSpec
from mdpd_vl.distill import Bottleneck, DistillConfig, DualPath, GenerationBlock
from mdpd_vl.distill.losses import masked_generation_loss, masked_rows_loss
from mdpd_vl.engine.memory import SavedTensorsMeter
from mdpd_vl.errors import UserError
from mdpd_vl.heads.pooling import GAPLinear
from mdpd_vl.side import build_side

CLASSES = 5


def make_dualpath(family: str, **cfg: object) -> tuple[DualPath, object]:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    torch.manual_seed(1)
    net = build_side("unipt", backbone.layer_specs, {"r": 2}, backbone=backbone)
    cfg.setdefault("d", 4)
    cfg.setdefault("backbone_trainable", "head")
    dp = DualPath(backbone, net, GAPLinear(net.out_width, CLASSES), GAPLinear(backbone.widths[-1], CLASSES),
                  DistillConfig(**cfg))  # type: ignore[arg-type]
    dp.train()
    return dp, make_input(backbone)


def step(dp: DualPath, x: object) -> tuple[dict[str, float], dict[str, torch.Tensor], int]:
    """(losses, gradients by parameter name, bytes saved for backward) of one training forward + backward."""
    labels = torch.arange(4) % CLASSES
    dp.zero_grad(set_to_none=True)
    with SavedTensorsMeter(exclude=list(dp.parameters())) as meter:
        out = dp(x, lambda y: F.cross_entropy(y, labels))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in dp.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in out.losses.items()}, grads, meter.bytes


def assert_same_step(a: tuple, b: tuple) -> None:
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for k in a[0]:
        assert a[0][k] == pytest.approx(b[0][k], rel=1e-5, abs=1e-9), k
    # float32 rounding is relative to the largest gradients that flow through the shared sums, so a
    # parameter whose own gradient is ~1e-6 of the step's may differ by ~1e-9 between two exact orders
    scale = max(g.abs().max().item() for g in b[1].values())
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-4,
                                   atol=1e-6 * scale + 1e-4 * a[1][n].abs().max().item())


# ----------------------------------------------------------------------------- exact cuts
@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_masked_only_and_folded_g_equal_the_full_papers_g(family: str) -> None:
    """deep_outputs=masked reads G at the masked tokens only, fold_up never builds the D_B-wide masked
    map: the losses and every gradient equal the reference (full G output, then the mask)."""
    ref = step(*make_dualpath(family, deep_outputs="all", fold_up=False))
    for options in ({"deep_outputs": "masked", "fold_up": False}, {"deep_outputs": "all", "fold_up": True},
                    {"deep_outputs": "masked", "fold_up": True}):
        assert_same_step(step(*make_dualpath(family, **options)), ref)
    for width in ("code", "bottleneck"):  # the other parametrisations: masked rows = the full output, masked
        assert_same_step(step(*make_dualpath(family, gen_width=width)),
                         step(*make_dualpath(family, gen_width=width, deep_outputs="all")))


def test_masked_only_saves_fewer_bytes_for_backward() -> None:
    full = step(*make_dualpath("vit", deep_outputs="all", fold_up=False))[2]
    masked = step(*make_dualpath("vit", deep_outputs="masked", fold_up=False))[2]
    folded = step(*make_dualpath("vit", deep_outputs="masked", fold_up=True))[2]
    assert folded < masked < full


@pytest.mark.parametrize("spec", [LayerSpec(8, (4, 4), prefix=1), LayerSpec(8, (3, 5)), LayerSpec(8)])
def test_second_conv_at_positions_equals_the_full_output_there(spec: LayerSpec) -> None:
    torch.manual_seed(0)
    g = GenerationBlock(spec, hidden=3)
    n = spec.prefix + (spec.grid[0] * spec.grid[1] if spec.grid else 9)
    x = torch.randn(2, n, 8)
    pos = torch.rand(2, n) < 0.5
    pos[:, : spec.prefix] = False
    torch.testing.assert_close(g.forward_at(x, pos), g(x)[pos])
    # the loss on those rows is the masked loss on the full output
    teacher = torch.randn(2, n, 8)
    torch.testing.assert_close(masked_rows_loss(teacher, g.forward_at(x, pos), pos),
                               masked_generation_loss(teacher, g(x), pos))


def test_folded_first_conv_is_the_conv_of_the_masked_lifted_code() -> None:
    torch.manual_seed(0)
    spec = LayerSpec(8, (4, 4), prefix=1)
    g, up = GenerationBlock(spec, hidden=3), torch.nn.Linear(2, 8)
    code, token = torch.randn(2, 17, 2), torch.randn(8)
    mask = torch.rand(2, 17) < 0.5
    mask[:, 0] = False
    s_bar = torch.where(mask.unsqueeze(-1), token, up(code))
    body, _ = g.body_map(s_bar)
    torch.testing.assert_close(g.folded_first(code, mask, up, token), F.relu(g.conv1(body)))


# ----------------------------------------------------------------------------- smaller modules
@pytest.mark.parametrize("family", ["vit", "bert"])
def test_bottleneck_width_g_has_the_analytic_parameter_count(family: str) -> None:
    d, hidden = 4, 3
    dp, x = make_dualpath(family, d=d, gen_hidden=hidden, gen_width="bottleneck")
    text = family == "bert"
    for i in dp.deep_layers:
        g = dp.generators[str(i)]
        assert sum(p.numel() for p in g.parameters()) == GenerationBlock.num_params(d, hidden, text)
    paper, _ = make_dualpath(family, d=d, gen_hidden=hidden)
    width = paper.backbone.widths[-1]
    assert sum(p.numel() for p in paper.generators[str(paper.deep_layers[0])].parameters()) == \
        GenerationBlock.num_params(width, hidden, text)
    # mask tokens live in the code width; the whole distill group is phi + G + tokens
    assert set(dp.mask_tokens) == {str(d)}
    sw, bw = dp.side.layer_widths, dp.backbone.widths
    expected = sum(Bottleneck.num_params(sw[i], d, bw[i]) for i in dp.shallow_layers + dp.deep_layers)
    expected += len(dp.deep_layers) * GenerationBlock.num_params(d, hidden, text) + d
    assert sum(p.numel() for p in dp.param_groups()["distill"]) == expected
    losses, grads, _ = step(dp, x)
    assert losses["deep"] > 0 and all(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("generators"))


def test_bottleneck_width_g_lifts_with_phis_up_projection_at_the_masked_tokens_only() -> None:
    dp, x = make_dualpath("vit", gen_width="bottleneck", fuse_loss=False)
    seen: list[int] = []
    i = dp.deep_layers[0]
    handle = dp.phi_of(i).up.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    step(dp, x)
    handle.remove()
    assert seen == [int(dp.last_masks[i].sum())]  # M x d rows, not B x N tokens
    full, _ = make_dualpath("vit", gen_width="bottleneck", deep_outputs="all")
    assert_same_step(step(full, x), step(*make_dualpath("vit", gen_width="bottleneck")))


@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_fused_loss_is_exact_and_keeps_no_wide_tensor(family: str) -> None:
    for width in ("backbone", "code", "bottleneck"):
        plain = step(*make_dualpath(family, gen_width=width, fuse_loss=False))
        fused = step(*make_dualpath(family, gen_width=width))
        assert_same_step(fused, plain)
        assert fused[2] < plain[2], width
    unfolded = step(*make_dualpath(family, fold_up=False, fuse_loss=False))  # the paper's G on s_bar, fused
    assert_same_step(step(*make_dualpath(family, fold_up=False)), unfolded)


def test_shared_phi_is_one_bottleneck_per_width_triple() -> None:
    dp, x = make_dualpath("vit", share_phi=True)
    layers = dp.shallow_layers + dp.deep_layers
    assert len(dp.phi) == 1 and all(dp.phi_of(i) is dp.phi_of(layers[0]) for i in layers)
    per_layer, _ = make_dualpath("vit")
    assert len(per_layer.phi) == len(layers)
    n = Bottleneck.num_params(dp.side.layer_widths[0], 4, dp.backbone.widths[0])
    assert sum(p.numel() for p in dp.phi.parameters()) == n
    _, grads, _ = step(dp, x)
    assert any(k.startswith("phi.") for k in grads)
    assert all(k.startswith(("backbone.", "head.")) for k in dp.fade().state_dict())


# ----------------------------------------------------------------------------- dtypes
def test_frozen_features_take_the_autocast_dtype_and_losses_stay_float32() -> None:
    fp32 = torch.randn(2, 3, 4)
    for choice, expected in (("compute", torch.bfloat16), ("native", torch.float32)):
        dp, x = make_dualpath("vit", feature_dtype=choice)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dp._frozen(fp32).dtype == expected, choice  # a float32 block output under autocast
            seen: list[torch.dtype] = []
            handle = dp.side.register_forward_pre_hook(lambda _m, args, seen=seen: seen.extend(t.dtype for t in args[0]))
            out = dp(x, lambda y: F.cross_entropy(y, torch.arange(4) % CLASSES))
        handle.remove()
        if choice == "compute":
            assert set(seen) == {torch.bfloat16}
        assert out.losses["shallow"].dtype == out.losses["deep"].dtype == torch.float32
        out.loss.backward()
    dp, x = make_dualpath("vit")  # without autocast nothing is cast
    assert dp._frozen(fp32) is not fp32 and dp._frozen(fp32).dtype == torch.float32
    seen = []
    dp.side.register_forward_pre_hook(lambda _m, args: seen.extend(t.dtype for t in args[0]))
    dp(x)
    assert set(seen) == {torch.float32}


def test_frozen_features_are_views_not_copies() -> None:
    dp, x = make_dualpath("vit")
    feats = dp.backbone.features(x)
    assert all(dp._frozen(f).untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in feats)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("field, value", [("gen_width", "side"), ("deep_outputs", "some"), ("fold_up", "yes"),
                                          ("share_phi", 1), ("feature_dtype", "fp16"), ("checkpointing", "every_0"),
                                          ("checkpointing", "half")])  # fmt: skip
def test_new_fields_are_validated_with_the_field_named(field: str, value: object) -> None:
    with pytest.raises(UserError) as err:
        DistillConfig(**{field: value})  # type: ignore[arg-type]
    assert err.value.field == field


@pytest.mark.parametrize("choice, segments", [(True, 2), (False, 0), ("all", 2), ("every_2", 1), ("sqrt", 1), (2, 1)])
def test_dualpath_applies_the_checkpointing_choice(choice: object, segments: int) -> None:
    torch.manual_seed(0)
    backbone = build_tiny_vit()
    net = build_side("unipt", backbone.layer_specs, {"r": 2}, backbone=backbone)
    DualPath(backbone, net, GAPLinear(net.out_width, 3), GAPLinear(backbone.widths[-1], 3),
             DistillConfig(d=4, checkpointing=choice))  # type: ignore[arg-type]
    assert len(backbone.checkpointing) == segments


@pytest.mark.parametrize("family", ["vit", "bert"])
def test_code_width_g_is_the_papers_g_with_its_folded_first_conv_learnt(family: str) -> None:
    """gen_width=code with conv1 set to the paper's folded weight (and every other tensor copied) gives
    the paper's deep loss: the same function class, d + 2 instead of D_B input channels."""
    paper, x = make_dualpath(family, split=0.0)
    code, _ = make_dualpath(family, split=0.0, gen_width="code")
    d, hidden = 4, 4
    text = family == "bert"
    for i in code.deep_layers:
        g = code.generators[str(i)]
        assert sum(p.numel() for p in g.parameters()) == GenerationBlock.num_params(
            d + 2, hidden, text, out_width=code.backbone.widths[i])
    assert len(code.mask_tokens) == 0
    state = {k: v for k, v in paper.state_dict().items() if not k.startswith(("mask_tokens", "generators"))}
    code.load_state_dict(state, strict=False)
    with torch.no_grad():
        for i in code.deep_layers:
            src, dst, phi = paper.generators[str(i)], code.generators[str(i)], paper.phi_of(i)
            token = paper.mask_tokens[str(paper.backbone.widths[i])]
            lift = torch.cat([phi.up.weight, phi.up.bias[:, None], token[:, None]], dim=1)
            w = src.conv1.weight
            dst.conv1.weight.copy_(torch.matmul(lift.t(), w.flatten(2)).reshape(dst.conv1.weight.shape))
            dst.conv1.bias.copy_(src.conv1.bias)
            dst.conv2.load_state_dict(src.conv2.state_dict())
    paper.eval(), code.eval()  # same step counter: the same masks
    torch.testing.assert_close(code(x).losses["deep"], paper(x).losses["deep"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("side", ["unipt", "lst"])
def test_bottleneck_on_the_side_networks_own_layout_equals_phi_at_full_resolution(side: str) -> None:
    """UniPT's CNN form and LST's pooled ladder keep s_l on a coarser grid; phi's M_down runs there and is
    upsampled (resampling is a convex combination of tokens, so it commutes with an affine map). Same
    losses and gradients as phi on the materialised full-resolution s_l."""
    from mdpd_vl.side.base import SideOutput

    coarse: list[bool] = []

    def build(materialise: bool) -> tuple:
        torch.manual_seed(0)
        backbone = BUILDERS["cnn"]()
        torch.manual_seed(1)
        net = build_side(side, backbone.layer_specs, {"r": 2}, backbone=backbone)
        forward = net.forward

        def wrapped(*args: object, **kwargs: object) -> SideOutput:
            out = forward(*args, **kwargs)
            coarse.extend(lift is not None for lift in out.lifts)
            # the reference: every s_l lifted to b_l's tokens before phi sees it
            return SideOutput(out.layers, out.tokens) if materialise else out

        net.forward = wrapped  # type: ignore[method-assign]
        dp = DualPath(backbone, net, GAPLinear(net.out_width, CLASSES), GAPLinear(backbone.widths[-1], CLASSES),
                      DistillConfig(d=4, backbone_trainable="head"))
        dp.train()
        return dp, make_input(backbone)

    ref, cut = step(*build(True)), step(*build(False))
    assert ref[0].keys() == cut[0].keys() and ref[1].keys() == cut[1].keys()
    for k in ref[0]:
        assert ref[0][k] == pytest.approx(cut[0][k], rel=1e-5, abs=1e-9), k
    scale = max(g.abs().max().item() for g in ref[1].values())  # gradients that are 0 analytically are noise
    for n in ref[1]:
        torch.testing.assert_close(ref[1][n], cut[1][n], rtol=1e-4, atol=1e-6 * scale + 1e-4 * ref[1][n].abs().max().item())
    assert any(coarse), f"{side} on a CNN keeps no layer coarse: nothing was tested"
