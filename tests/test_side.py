"""Side networks (UniPT, SHERL, LST): layouts, gradients, frozen backbone, official forms, config errors."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.distill.dualpath import SideKeptModel
from mdpd_vl.errors import UserError
from mdpd_vl.side import (
    SIDE_NETWORKS,
    LSTConfig,
    SHERLConfig,
    SideConfigError,
    UniPTConfig,
    build_side,
)
from mdpd_vl.side.lst import SideBlock, resample_tokens
from mdpd_vl.side.sherl import BlockRunner, block_family

NAMES = ["unipt", "sherl", "lst"]
# every configuration the generic tests run over: name -> (side network, config)
VARIANTS = {"unipt": ("unipt", {}), "unipt_clip4clip": ("unipt", {"variant": "clip4clip"}),
            "sherl": ("sherl", {}), "lst": ("lst", {})}
TEXT_N = 7
# fake backbone layouts: ViT (class token + 3x3 grid), text (no grid), CNN stages (grids and widths shrink/grow)
LAYOUTS = {
    "vit": [LayerSpec(24, (3, 3), 1)] * 4,
    "text": [LayerSpec(20)] * 3,
    "cnn": [LayerSpec(8, (8, 8)), LayerSpec(12, (4, 4)), LayerSpec(16, (4, 4)), LayerSpec(24, (2, 2))],
}


def _num_tokens(spec: LayerSpec) -> int:
    return spec.prefix + spec.grid[0] * spec.grid[1] if spec.grid else TEXT_N


def _fake_inputs(layout: str, batch: int = 3, seed: int = 0) -> tuple[list[Tensor], Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(batch, _num_tokens(s), s.width, generator=g) for s in LAYOUTS[layout]]
    mask = None
    if layout == "text":
        mask = torch.ones(batch, TEXT_N, dtype=torch.bool)
        mask[1, 4:] = False
        mask[2, 1:] = False
    return feats, mask


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cases() -> list[tuple[str, str]]:
    # clip4clip needs one token layout (a transformer): not the CNN stages
    return [(v, lay) for v in VARIANTS for lay in LAYOUTS if not (v == "unipt_clip4clip" and lay == "cnn")]


# -- fake layouts ------------------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "layout"), _cases())
def test_output_shapes_follow_every_layer(variant: str, layout: str) -> None:
    name, cfg = VARIANTS[variant]
    specs = LAYOUTS[layout]
    net = build_side(name, specs, {**cfg, "out_width": 10})
    feats, mask = _fake_inputs(layout)
    out = net(feats, mask)
    assert len(out.layers) == len(specs) == len(net.layer_widths)
    for b, s, w in zip(feats, out.layers, net.layer_widths):
        assert s.shape == (b.shape[0], b.shape[1], w)  # same tokens as b_l: MDPD distils per token
    tokens = 1 if variant == "unipt_clip4clip" else feats[-1].shape[1]  # clip4clip: one anchor token
    assert net.out_width == 10 and out.tokens.shape == (3, tokens, 10)
    assert all(torch.isfinite(t).all() for t in [*out.layers, out.tokens])
    d = specs[-1].width // 2
    if name == "unipt":  # official: every layer projected straight to the fusion width
        assert net.layer_widths == [d] * len(specs)
    if name == "sherl":  # projected layers it reads, then the backbone width of the re-run ones
        assert net.layer_widths == [d] * net.reads_layers + [s.width for s in specs[net.reads_layers:]]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_text_tokens_change_nothing_valid(variant: str) -> None:
    torch.manual_seed(0)
    name, cfg = VARIANTS[variant]
    net = build_side(name, LAYOUTS["text"], cfg).eval()  # eval: SHERL's fc_out has dropout
    with torch.no_grad():
        if name == "sherl":
            net.alpha.fill_(0.05)  # open the gate so h takes part too
    feats, mask = _fake_inputs("text")
    noisy = [f.masked_fill(~mask[..., None], 1e3) for f in feats]
    a, b = net(feats, mask), net(noisy, mask)
    valid = mask[..., None]
    for x, y in zip(a.layers, b.layers):
        assert torch.allclose(x * valid, y * valid, atol=1e-5)
    if a.tokens.shape[1] == TEXT_N:
        assert torch.allclose(a.tokens * valid, b.tokens * valid, atol=1e-4)
    else:
        assert torch.allclose(a.tokens, b.tokens, atol=1e-4)


@pytest.mark.parametrize(("variant", "layout"), _cases())
def test_gradients_reach_every_side_parameter(variant: str, layout: str) -> None:
    torch.manual_seed(0)
    name, cfg = VARIANTS[variant]
    net = build_side(name, LAYOUTS[layout], cfg)
    feats, mask = _fake_inputs(layout)
    out = net(feats, mask)
    loss = out.tokens.square().mean() + sum(s.square().mean() for s in out.layers)
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead  # SHERL's alpha included: the closed gate still passes d/dalpha = h / T
    assert all(f.grad is None for f in feats)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count_grows_like_one_over_r(name: str) -> None:
    specs = [LayerSpec(64, (2, 2), 1)] * 4
    p2, p4, p8 = (_params(build_side(name, specs, {"r": r})) for r in (2, 4, 8))
    assert p2 > p4 > p8
    # the r-dependent part is at least ~1/r (projections: 1/r; d x d maps and LST blocks: 1/r^2)
    assert 1.8 <= (p2 - p4) / (p4 - p8) <= 4.5


# -- UniPT: the official VSE-infinity forms, against the formulas written out here -------------------
def _l1(x: Tensor, dim) -> Tensor:
    return x / x.abs().sum(dim=dim, keepdim=True).clamp_min(1e-6)


def test_unipt_token_form_is_the_official_formula() -> None:
    torch.manual_seed(0)
    specs = LAYOUTS["text"]
    net = build_side("unipt", specs, {}).eval()
    feats, mask = _fake_inputs("text")
    out = net(feats, mask)
    m = mask.float()
    mean = lambda t: (t * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # noqa: E731
    t = [net.down[i](b) for i, b in enumerate(feats)]
    for s in out.layers:  # LayerNorm after every per-layer projection (affine = identity at init)
        assert torch.allclose(s.mean(-1), torch.zeros(()), atol=1e-5)
    anchor = t[-1]
    merged, conf = [], []
    for target in t[:-1]:  # the anchor is not fused with itself
        w = _l1(torch.relu((anchor @ target.transpose(1, 2)) * m[:, None, :]), -1) + torch.eye(TEXT_N)
        merged.append(w @ target)
        conf.append(net.fusion.gate(mean(anchor) * mean(target)))
    c = torch.softmax(torch.cat(conf, 1), 1)
    fused = sum(c[:, i, None, None] * merged[i] for i in range(len(merged)))
    want = net.fusion.up(anchor + net.fusion.proj(fused))  # LN after the merge projection, no raw b_L
    assert isinstance(net.fusion.proj[1], nn.LayerNorm)
    assert torch.allclose(out.tokens, want, atol=1e-5)


def test_unipt_cnn_form_uses_anchor_guided_pooling() -> None:
    torch.manual_seed(0)
    specs = LAYOUTS["cnn"]
    net = build_side("unipt", specs, {}).eval()
    feats, _ = _fake_inputs("cnn")
    b0, anchor = feats[0], feats[-1]  # 8x8 stage onto the 2x2 anchor: rate 4, as the official unfold / fold
    fmap = b0.transpose(1, 2).reshape(3, 8, 8, 8)
    guide = net.identity["0"](anchor).transpose(1, 2).reshape(3, 8, 2, 2)
    score = (F.interpolate(guide, size=(8, 8), mode="nearest") * fmap).sum(1, keepdim=True)
    patches = F.unfold(score, kernel_size=4, stride=4)  # B x 16 x 4
    weights = F.fold(_l1(torch.relu(patches), 1), output_size=(8, 8), kernel_size=4, stride=4) + 1 / 16
    pooled = F.avg_pool2d(weights * fmap, 4, stride=4, divisor_override=1)
    got = net.anchor_pool(0, b0, anchor)
    assert torch.allclose(got, pooled.flatten(2).transpose(1, 2), atol=1e-5)
    assert isinstance(net.down[0][1], nn.BatchNorm1d)  # conv1x1 + BatchNorm, as the official CNN form


def test_unipt_clip4clip_anchor_is_the_class_token() -> None:
    torch.manual_seed(0)
    net = build_side("unipt", LAYOUTS["vit"], {"variant": "clip4clip"}).eval()
    feats, _ = _fake_inputs("vit")
    out = net(feats)
    changed = [f.clone() for f in feats]
    changed[-1][:, 1:] += 1.0  # the anchor is b_L's class token: other tokens of b_L only act as a target
    assert out.tokens.shape == (3, 1, 24)
    moved = net(changed).tokens
    assert not torch.allclose(moved, out.tokens)
    net_last = build_side("unipt", LAYOUTS["text"], {"variant": "clip4clip", "class_token": "last"})
    _, mask = _fake_inputs("text")
    assert net_last.class_index(torch.zeros(3, TEXT_N, 1), mask).tolist() == [6, 3, 0]  # last valid token


# -- LST: ladder, gates, selection ---------------------------------------------------------------
def test_lst_gates_are_half_at_init_and_a_dropped_layer_loses_block_and_connection() -> None:
    torch.manual_seed(0)
    specs = LAYOUTS["cnn"]
    full = build_side("lst", specs, {})
    net = build_side("lst", specs, LSTConfig(layers=[2, 0]))
    assert torch.equal(net.gates(), torch.full((2,), 0.5))  # one gate per selected layer
    assert sorted(net.blocks.keys()) == sorted(net.down.keys()) == ["0", "2"] and _params(net) < _params(full)
    feats, _ = _fake_inputs("cnn")
    out = net(feats)
    assert len(out.layers) == len(specs)
    # layer 1 is dropped: no down projection, no gate; its s_1 is the ladder state carried on
    h = resample_tokens(out.layers[0], specs[0], specs[1], feats[1].shape[1])
    assert torch.allclose(out.layers[1], h, atol=1e-6)
    changed = [f.clone() for f in feats]
    changed[1] += 5.0
    assert torch.equal(net(changed).tokens, out.tokens)  # nothing of b_1 reaches the ladder


def test_resample_keeps_prefix_and_pools_grid() -> None:
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)
    y = resample_tokens(x, LayerSpec(3, (4, 4), 1), LayerSpec(3, (2, 2), 1), 5)
    assert y.shape == (2, 5, 3) and torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(y[:, 1], x[:, [1, 2, 5, 6]].mean(1))
    up = resample_tokens(y, LayerSpec(3, (2, 2), 1), LayerSpec(3, (4, 4), 0), 16)
    assert up.shape == (2, 16, 3)


# -- config errors -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "cfg", "field"),
    [
        ("unipt", {"d": 25}, "d"),  # larger than the deepest width 24
        ("sherl", {"d": 100}, "d"),
        ("lst", {"layers": [0, 4]}, "layers"),  # 4 layers: valid 0..3
        ("lst", {"layers": []}, "layers"),
        ("lst", {"heads": 5}, "heads"),  # side width 12
        ("sherl", {"late_blocks": 4}, "late_blocks"),
        ("unipt", {"r": 25}, "r"),  # leaves a layer with width 0
        ("unipt", {"variant": "clip4clip"}, "variant"),  # fine on the ViT layout: checked on CNN below
    ],
)
def test_bad_config_against_the_backbone(name: str, cfg: dict, field: str) -> None:
    layout = "cnn" if cfg.get("variant") == "clip4clip" else "vit"
    with pytest.raises(ValueError, match=rf"\.{field}: ") as err:
        build_side(name, LAYOUTS[layout], cfg)
    assert isinstance(err.value, UserError)


@pytest.mark.parametrize(
    ("cls", "kwargs", "field"),
    [(UniPTConfig, {"r": 0}, "r"), (SHERLConfig, {"d": 0}, "d"), (LSTConfig, {"layers": [1, 1]}, "layers"),
     (LSTConfig, {"layers": [-1]}, "layers"), (SHERLConfig, {"gate_temperature": 0}, "gate_temperature"),
     (UniPTConfig, {"r": 1.5}, "r"), (UniPTConfig, {"variant": "meanp"}, "variant"),
     (UniPTConfig, {"class_token": "eot"}, "class_token"), (SHERLConfig, {"late_blocks": 0}, "late_blocks")],
)
def test_bad_config_fields(cls: type, kwargs: dict, field: str) -> None:
    with pytest.raises(SideConfigError, match=rf"{cls.__name__}\.{field}: "):
        cls(**kwargs)


def test_registry_and_build_errors() -> None:
    assert SIDE_NETWORKS.names() == ["lst", "sherl", "unipt"]
    assert all(f.metadata.get("help") for f in LSTConfig.__dataclass_fields__.values())
    with pytest.raises(UserError, match="unknown side network 'dtl'"):
        build_side("dtl", LAYOUTS["vit"])
    with pytest.raises(SideConfigError, match="unknown keys \\['rr'\\]"):
        build_side("lst", LAYOUTS["vit"], {"rr": 2})
    with pytest.raises(SideConfigError, match="needs a LSTConfig"):
        build_side("lst", LAYOUTS["vit"], UniPTConfig())
    with pytest.raises(ValueError, match="no layers"):
        build_side("unipt", [], {})


# -- tiny real backbones (test-local wrappers over the real models' blocks) ---------------------------
class _Hooked(Backbone):
    """A minimal Backbone over `model` whose layers are `blocks`; grids read from the probe."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], example, prefix: int = 0, text: bool = False):
        super().__init__()
        self.model, self._blocks_list, self._example, self._prefix = model, blocks, example, prefix
        self.modality = "text" if text else "image"
        self._grids: dict[int, tuple[int, int]] = {}
        self._setup()

    def _block_modules(self) -> list[nn.Module]:
        return list(self._blocks_list)

    def _run(self, x):
        return self.model(**x) if isinstance(x, dict) else self.model(x)

    def _to_tokens(self, index: int, out) -> Tensor:
        out = out[0] if isinstance(out, (tuple, list)) else out
        if out.dim() == 4:
            self._grids[index] = (out.shape[-2], out.shape[-1])
        return super()._to_tokens(index, out)

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        if self.modality == "text":
            return LayerSpec(tokens.shape[-1])
        if index in self._grids:
            return LayerSpec(tokens.shape[-1], self._grids[index], 0)
        side = int(round((tokens.shape[1] - self._prefix) ** 0.5))
        return LayerSpec(tokens.shape[-1], (side, side), self._prefix)

    def padding_mask(self, x) -> Tensor | None:
        return x["attention_mask"].bool() if isinstance(x, dict) else None

    def example_input(self, batch_size: int = 2):
        return self._example(batch_size)

    def spec(self) -> dict:
        return {}


def _images(size: int):
    return lambda b: torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(b))


def _open_clip_vit() -> Backbone:
    vt = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    model = vt.VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=2.0,
                                 output_dim=16)
    return _Hooked(model, list(model.transformer.resblocks), _images(32), prefix=1)


def _bert() -> Backbone:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=16)
    model = tf.BertModel(cfg)

    def text(b: int) -> dict[str, Tensor]:
        ids = torch.randint(1, 50, (b, 6), generator=torch.Generator().manual_seed(b))
        mask = torch.ones(b, 6, dtype=torch.long)
        mask[-1, 3:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return _Hooked(model, list(model.encoder.layer), text, text=True)


def _hf_vit() -> Backbone:
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64)
    model = tf.ViTModel(cfg, add_pooling_layer=False)
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    return _Hooked(model, list(layers), _images(32), prefix=1)


def _timm_cnn() -> Backbone:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    return _Hooked(model, list(model.blocks), _images(64))


def _timm_resnet() -> Backbone:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, layers=(1, 1, 1, 3),
                              channels=(8, 16, 32, 64), stem_width=8)
    return _Hooked(model, [model.layer1, model.layer2, model.layer3, model.layer4], _images(64))


BACKBONES = {"open_clip_vit": _open_clip_vit, "bert": _bert, "hf_vit": _hf_vit, "timm_cnn": _timm_cnn,
             "timm_resnet": _timm_resnet}


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_real_backbone_trains_side_only(kind: str) -> None:
    backbone = BACKBONES[kind]()
    x = backbone.example_input(2)
    backbone.eval()
    mask = backbone.padding_mask(x)
    backbone.train()  # BatchNorm in train mode: a re-run block must still not touch running stats
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    for variant, (name, cfg) in VARIANTS.items():
        cnn = kind.startswith("timm_")
        if variant == "unipt_clip4clip" and cnn:
            continue
        net = build_side(name, backbone.layer_specs, cfg, backbone=backbone)
        assert net.reads_input == (not cnn)  # transformers expose their embeddings b_0
        if name == "sherl":
            assert net.uses_backbone_blocks
        backbone.eval()
        with torch.no_grad():
            feats, emb = net.backbone_inputs(backbone, x)
        backbone.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        out = net(feats, mask, emb)
        all_feats = backbone.eval().features(x)
        backbone.train()
        for b, s in zip(all_feats, out.layers):
            assert s.shape[:2] == b.shape[:2]
        (out.tokens.square().mean() + sum(s.square().mean() for s in out.layers)).backward()
        dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not dead, (variant, dead)
        opt.step()
        assert all(p.grad is None for p in backbone.parameters())
        assert not {id(p) for p in net.parameters()} & {id(p) for p in backbone.parameters()}
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and buffers untouched


# -- SHERL: the side output always goes through the frozen last block ------------------------------
def _last_block_on(backbone: Backbone, x, replacement: Tensor) -> Tensor:
    """b_L of the real backbone when its last block's input is replaced by `replacement` (B x N x D)."""
    def swap(_m, args, kwargs):
        first = args[0]
        new = replacement if first.shape == replacement.shape else replacement.transpose(0, 1)
        return (new, *args[1:]), kwargs

    handle = backbone.blocks[-1].register_forward_pre_hook(swap, with_kwargs=True)
    try:
        with torch.no_grad():
            return backbone.features(x)[-1]
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["open_clip_vit", "bert"])
def test_sherl_frozen_last_block_receives_the_side_output_at_init(kind: str) -> None:
    backbone = BACKBONES[kind]().eval()
    x = backbone.example_input(2)
    mask = backbone.padding_mask(x)
    net = build_side("sherl", backbone.layer_specs, {}, backbone=backbone).eval()
    assert float(net.gate().detach()) == 0.0 and net.reads_layers == backbone.num_layers - 1
    seen: list[Tensor] = []
    net.fc_out.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        feats, emb = net.backbone_inputs(backbone, x)
    out = net(feats, mask, emb)
    want = _last_block_on(backbone, x, seen[0])  # gate closed: the frozen block sees fc_out(fused) alone
    valid = mask[..., None] if mask is not None else 1
    assert torch.allclose(out.tokens * valid, want * valid, atol=1e-5)
    out.tokens.square().sum().backward()
    assert net.fc_out[1].weight.grad.abs().sum() > 0  # through the frozen block into fc_out
    assert net.alpha.grad is not None and net.alpha.grad.abs() > 0
    assert all(p.grad is None for p in backbone.parameters())


class _Tokens(nn.Module):
    def forward(self, tokens: Tensor, _mask: Tensor | None) -> Tensor:
        return tokens


def test_sherl_served_alone_runs_the_official_number_of_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = _bert().eval()
    x = backbone.example_input(2)
    net = build_side("sherl", backbone.layer_specs, {}, backbone=backbone)
    kept = SideKeptModel(backbone, net, _Tokens()).eval()
    cls = type(backbone.blocks[0])
    calls = {"n": 0}
    original = cls.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    with torch.no_grad():
        y = kept(x)
        assert calls["n"] == backbone.num_layers  # L - 1 backbone blocks + the last one re-run, not L + 1
        full = backbone.features(x, with_input=True)
        ref = net(full[1:], backbone.padding_mask(x), full[0]).tokens  # the MDPD path, given every layer
    assert torch.allclose(y, ref, atol=1e-6)


@pytest.mark.parametrize("kind", ["timm_cnn", "timm_resnet"])
def test_sherl_cnn_reruns_the_last_unit_of_the_deepest_stage(kind: str) -> None:
    backbone = BACKBONES[kind]().eval()
    net = build_side("sherl", backbone.layer_specs, {}, backbone=backbone)
    route = net._route[0]
    deepest = backbone.blocks[route.read]
    assert route.late.blocks[0].block is list(deepest)[-1]  # the last unit (bottleneck) only
    assert (route.pre is None) == (len(deepest) == 1)  # earlier units of that stage give h
    x = backbone.example_input(2)
    with torch.no_grad():
        feats, _ = net.backbone_inputs(backbone, x)
    assert len(feats) == route.read
    out = net(feats)
    assert out.tokens.shape == backbone.features(x)[-1].shape


# -- LST: ladder from the embeddings, pruned init by default -----------------------------------------
def test_lst_ladder_starts_from_the_embeddings_with_pruned_blocks() -> None:
    backbone = _bert().eval()
    net = build_side("lst", backbone.layer_specs, {"mlp_ratio": 1.0}, backbone=backbone)
    assert net.cfg.init_from_backbone and net.reads_input
    assert net.first_down.in_features == backbone.input_spec.width
    src = torch.cat([p.detach().flatten() for p in backbone.blocks[0].parameters()])
    assert torch.isin(net.blocks["0"].qkv.weight.detach(), src).all()  # pruned from the backbone by default
    x = backbone.example_input(2)
    with torch.no_grad():
        feats, emb = net.backbone_inputs(backbone, x)
        a = net(feats, backbone.padding_mask(x), emb).tokens
        b = net(feats, backbone.padding_mask(x), emb + 1.0).tokens
    assert not torch.allclose(a, b)  # the embeddings feed the ladder


# -- re-running backbone blocks standalone ---------------------------------------------------------
@pytest.mark.parametrize("batch_first", [True, False])
def test_runner_open_clip_blocks_nld_and_lnd(batch_first: bool) -> None:
    vt = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    tower = vt.Transformer(width=16, layers=2, heads=2, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16)
    runner = BlockRunner(list(tower.resblocks), LayerSpec(16), tower)
    assert runner.families == ["open_clip"] * 2
    assert torch.allclose(runner(x, None), tower(x), atol=1e-5)


def _block_io(backbone: Backbone, x, k: int) -> tuple[Tensor, Tensor]:
    backbone.eval()
    with torch.no_grad():
        feats = backbone.features(x)
    return feats[-k - 1], feats[-1]


def test_runner_open_clip_text_is_causal() -> None:
    vt = pytest.importorskip("open_clip.transformer")
    torch.manual_seed(0)
    model = vt.TextTransformer(context_length=8, vocab_size=50, width=32, heads=2, layers=2, output_dim=16)
    ids = lambda b: torch.randint(0, 50, (b, 8), generator=torch.Generator().manual_seed(b))  # noqa: E731
    backbone = _Hooked(model, list(model.transformer.resblocks), ids, text=True)
    inp, out = _block_io(backbone, ids(2), 1)
    runner = BlockRunner(backbone.blocks[-1:], LayerSpec(32), backbone)
    assert isinstance(runner.causal[0], Tensor)
    assert torch.allclose(runner(inp, None), out, atol=1e-5)


def test_runner_hf_bert_with_padding() -> None:
    backbone = _bert()
    x = backbone.example_input(2)
    inp, out = _block_io(backbone, x, 1)
    runner = BlockRunner(backbone.blocks[-1:], LayerSpec(32), backbone)
    assert runner.families == ["hf"] and runner.causal == [False]
    mask = backbone.padding_mask(x)
    got = runner(inp, mask)
    assert torch.allclose(got[mask], out[mask], atol=1e-5)
    assert not torch.allclose(runner(inp, None)[-1], out[-1], atol=1e-5)  # the mask matters


def test_runner_timm_conv_stages_use_maps() -> None:
    backbone = _timm_cnn()
    inp, out = _block_io(backbone, backbone.example_input(2), 2)
    specs = backbone.layer_specs
    runner = BlockRunner(backbone.blocks[-2:], specs[-3], backbone)
    assert runner.families == ["map", "map"] and block_family(SideBlock(8, 2)) == "tokens"
    assert torch.allclose(runner(inp, None), out, atol=1e-4)


# -- LST init by structured pruning ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["open_clip_vit", "bert", "hf_vit"])
def test_lst_init_from_backbone_copies_pruned_weights(kind: str) -> None:
    backbone = BACKBONES[kind]()
    net = build_side("lst", backbone.layer_specs, {"mlp_ratio": 1.0}, backbone=backbone)
    assert net.cfg.init_from_backbone  # the default, as the official scripts
    for i, block in enumerate(backbone.blocks):
        src = torch.cat([p.detach().flatten() for p in block.parameters()])
        side = net.blocks[str(i)]
        for w in (side.qkv.weight, side.proj.weight, side.fc1.weight, side.fc2.bias):
            assert torch.isin(w.detach(), src).all()  # every entry comes from the backbone block
    assert net.blocks["0"].heads == 2  # kept the backbone's heads (32 // 2 = 16 wide side blocks)


def test_lst_init_from_cnn_falls_back_to_random(caplog: pytest.LogCaptureFixture) -> None:
    specs = LAYOUTS["cnn"]
    with caplog.at_level(logging.WARNING):
        build_side("lst", specs, {"init_from_backbone": True})  # no backbone given
    assert "random init" in caplog.text
    caplog.clear()
    backbone = _timm_cnn()
    with caplog.at_level(logging.WARNING):
        net = build_side("lst", backbone.layer_specs, {"init_from_backbone": True, "layers": [5, 6]},
                         backbone=backbone)
    assert "not transformer blocks" in caplog.text and sorted(net.blocks.keys()) == ["5", "6"]


def test_sherl_falls_back_without_backbone(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        net = build_side("sherl", LAYOUTS["text"], {})
    assert not net.uses_backbone_blocks and "falls back" in caplog.text
