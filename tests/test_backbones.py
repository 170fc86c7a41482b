"""Backbone wrappers on tiny random-init models (no downloads): layers, shapes, norms, checkpointing, specs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from mdpd_vl.backbones import build_backbone, build_pair
from mdpd_vl.backbones.base import Backbone, checkpoint_segments
from mdpd_vl.errors import UserError

TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
    text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=2, layers=3),
)
TINY_RN = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=64, layers=[1, 1, 1, 1], width=8, head_width=8),
    text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
)
TINY_BERT = dict(
    model_type="bert",
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
)
TINY_VIT = dict(
    model_type="vit",
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "small", "red", "circle", "left", "of", "blue", "square"]


@dataclass
class Case:
    backbone: Backbone
    layers: int  # block count, from the config the case was built with
    block_prefixes: list[str]  # names (inside backbone.model) of the modules whose outputs are the layers
    prefix_tokens: int | None = None  # non-grid tokens per layer (ViT class token), None for maps/text
    patch_grid: tuple[int, int] | None = None  # ViT: image_size // patch_size from the config


def _word_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")


def _build(name: str) -> Case:
    if name in ("open_clip_vit", "open_clip_text"):
        image, text = _shared_clip()
        if name == "open_clip_vit":
            blocks = [f"transformer.resblocks.{i}" for i in range(2)]
            vc = TINY_CLIP["vision_cfg"]
            grid = (vc["image_size"] // vc["patch_size"],) * 2
            return Case(image, 2, blocks, prefix_tokens=1, patch_grid=grid)
        return Case(text, 3, [f"transformer.resblocks.{i}" for i in range(3)])
    if name == "open_clip_rn":
        from mdpd_vl.backbones.open_clip import OpenClipImage

        return Case(OpenClipImage("RN50", **TINY_RN), 4, [f"layer{i}" for i in range(1, 5)])
    if name == "open_clip_timm":  # a timm trunk inside an open_clip image tower
        from mdpd_vl.backbones.open_clip import OpenClipImage

        vision = dict(
            timm_model_name="convnext_atto",
            timm_model_pretrained=False,
            timm_pool="avg",
            timm_proj="linear",
            image_size=64,
        )
        b = OpenClipImage("convnext_base", **dict(TINY_RN, vision_cfg=vision))
        return Case(b, 4, [f"trunk.stages.{i}" for i in range(4)])
    if name == "hf_bert":
        from mdpd_vl.backbones.hf import HFText

        b = HFText(config=TINY_BERT, tokenizer=_word_tokenizer())
        return Case(b, 2, [f"encoder.layer.{i}" for i in range(2)])
    if name == "hf_vit":
        from mdpd_vl.backbones.hf import HFVision

        b = HFVision(config=TINY_VIT)
        base = "layers" if hasattr(b.model, "layers") else "encoder.layer"  # transformers 5.x moved them
        grid = (TINY_VIT["image_size"] // TINY_VIT["patch_size"],) * 2
        return Case(b, 3, [f"{base}.{i}" for i in range(3)], prefix_tokens=1, patch_grid=grid)
    if name == "timm_effnet":
        from mdpd_vl.backbones.timm import TimmCNN

        b = TimmCNN("efficientnet_lite0", image_size=64)
        stages = len(b.model.blocks)
        return Case(b, stages + 1, [f"blocks.{i}" for i in range(stages)] + ["bn2"])
    if name == "timm_resnet":
        from mdpd_vl.backbones.timm import TimmCNN

        b = TimmCNN("resnet18", image_size=64, layers=(1, 1, 1, 1))
        return Case(b, 4, [f"layer{i}" for i in range(1, 5)])
    raise KeyError(name)


_CLIP_CACHE: dict[str, Any] = {}


def _shared_clip() -> Any:
    if "pair" not in _CLIP_CACHE:
        from mdpd_vl.backbones.open_clip import open_clip_pair

        _CLIP_CACHE["pair"] = open_clip_pair("ViT-B-32", **TINY_CLIP)
    return _CLIP_CACHE["pair"]


NAMES = [
    "open_clip_vit",
    "open_clip_text",
    "open_clip_rn",
    "open_clip_timm",
    "hf_bert",
    "hf_vit",
    "timm_effnet",
    "timm_resnet",
]


@pytest.fixture(scope="module", params=NAMES)
def case(request: pytest.FixtureRequest) -> Case:
    torch.manual_seed(0)
    c = _build(request.param)
    c.backbone.eval()  # no dropout / BN-stat updates, so repeated passes are comparable
    return c


def _raw_block_outputs(backbone: Backbone, x: Any) -> list[torch.Tensor]:
    """Block outputs collected by our own hooks, independent of the wrapper's."""
    outs: list[torch.Tensor] = []
    hooks = [
        b.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for b in backbone.blocks
    ]
    try:
        with torch.no_grad():
            backbone.features(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_layer_count_and_blocks(case: Case) -> None:
    b = case.backbone
    assert b.num_layers == case.layers == len(b.blocks)
    modules = dict(b.model.named_modules())
    assert [id(m) for m in b.blocks] == [id(modules[p]) for p in case.block_prefixes]


def test_shapes_widths_and_grids(case: Case) -> None:
    b = case.backbone
    x = b.example_input(3)
    with torch.no_grad():
        feats = b.features(x)
    raw = _raw_block_outputs(b, x)
    assert len(feats) == len(raw) == b.num_layers
    assert b.widths == [f.shape[-1] for f in feats]
    for spec, f, r in zip(b.layer_specs, feats, raw):
        assert f.dim() == 3 and f.shape[0] == 3  # B x N x D
        if r.dim() == 4:  # CNN map: grid is its H x W, tokens are the flattened map
            assert spec.grid == tuple(r.shape[-2:]) and spec.width == r.shape[1]
            torch.testing.assert_close(f, r.flatten(2).transpose(1, 2))
        elif spec.grid is not None:  # ViT: class token + patch grid
            assert spec.prefix == case.prefix_tokens and spec.grid == case.patch_grid
            assert f.shape[1] == spec.prefix + spec.grid[0] * spec.grid[1]
        else:
            assert b.modality == "text" and f.shape[1] == x["input_ids"].shape[1]
    if b.modality == "image":
        assert b.grid == b.layer_specs[-1].grid is not None
    else:
        assert b.grid is None


def _is_norm_module(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm))


def _expected_norm_params(case: Case, last_k: int | None = None) -> set[int]:
    prefixes = (
        case.block_prefixes if last_k is None else case.block_prefixes[len(case.block_prefixes) - last_k :]
    )
    out = set()
    for name, m in case.backbone.model.named_modules():
        inside = any(name == p or name.startswith(p + ".") for p in prefixes)
        if inside and _is_norm_module(m):
            out |= {id(p) for p in m.parameters(recurse=False)}
    return out


def test_norm_parameters(case: Case) -> None:
    b = case.backbone
    got = b.norm_parameters()
    assert got and {id(p) for _, p in got} == _expected_norm_params(case)
    assert len({id(p) for _, p in got}) == len(got)  # no duplicates
    names = dict(b.named_parameters())
    assert all(names[n] is p and p.dim() == 1 for n, p in got)
    for k in (1, 2):
        assert {id(p) for _, p in b.norm_parameters(last_k=k)} == _expected_norm_params(case, k)
    assert b.norm_parameters(last_k=0) == []


def _loss_and_grads(b: Backbone, x: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    b.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        feats = b.features(x)
        loss = sum((f.float() ** 2).mean() for f in feats)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in b.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved[0]


@pytest.mark.parametrize("choice", [True, "every_2", "sqrt"])
def test_checkpointing_same_outputs_and_grads(case: Case, choice: object) -> None:
    b = case.backbone
    torch.manual_seed(1)
    x = b.example_input(2)
    loss0, grads0, saved0 = _loss_and_grads(b, x)
    b.set_checkpointing(choice)  # type: ignore[arg-type]
    try:
        assert b.checkpointing
        loss1, grads1, saved1 = _loss_and_grads(b, x)
    finally:
        b.set_checkpointing(False)
    assert b.checkpointing == []
    loss2, grads2, _ = _loss_and_grads(b, x)
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and grads0
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grads2[n], grads0[n])
    assert saved1 < saved0  # block activations were really dropped and recomputed
    b.zero_grad(set_to_none=True)


def test_checkpoint_segments_of_each_choice() -> None:
    seg = checkpoint_segments
    assert seg(True, 4) == seg("all", 4) == seg(1, 4) == [[0], [1], [2], [3]]
    assert seg(False, 4) == seg(None, 4) == seg("none", 4) == []
    assert seg("every_2", 5) == seg(2, 5) == [[0], [2], [4]]
    assert seg("every_3", 12) == [[0], [3], [6], [9]]
    assert seg("sqrt", 12) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert seg("sqrt", 6) == [[0, 1, 2], [3, 4, 5]]
    for bad in ("every_0", "half", 0, -1, 2.5):
        with pytest.raises(ValueError, match="unknown checkpointing"):
            seg(bad, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_granularity_orders_the_saved_bytes_with_identical_gradients(family: str) -> None:
    """Four blocks: sqrt (2 runs of 2) keeps only 2 run inputs, all keeps 4 block inputs, every_2 keeps
    2 inputs and the activations of the 2 blocks it leaves alone; none keeps every activation. The
    segment runs really recompute as one (a fallback would save as much as every block alone)."""
    from conftest import build_tiny_bert, build_tiny_cnn, build_tiny_vit

    torch.manual_seed(0)
    b = {"vit": lambda: build_tiny_vit(4), "bert": lambda: build_tiny_bert(4), "cnn": build_tiny_cnn}[family]()
    b.eval()
    x = b.example_input(2)
    saved, grads = {}, {}
    for choice in ("none", "all", "every_2", "sqrt"):
        b.set_checkpointing(choice)
        _, grads[choice], saved[choice] = _loss_and_grads(b, x)
    assert b.checkpointing == [[0, 1], [2, 3]]
    assert saved["sqrt"] < saved["all"] < saved["every_2"] < saved["none"]
    for choice in ("all", "every_2", "sqrt"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[choice][n], g, rtol=1e-4, atol=1e-6)


def test_spec_rebuilds_same_architecture(case: Case) -> None:
    b = case.backbone
    spec = json.loads(json.dumps(b.spec()))  # must be plain JSON
    rebuilt = build_backbone(spec)
    assert type(rebuilt) is type(b)
    assert {n: p.shape for n, p in rebuilt.state_dict().items()} == {
        n: p.shape for n, p in b.state_dict().items()
    }
    assert rebuilt.layer_specs == b.layer_specs


def test_padding_mask_and_output(case: Case) -> None:
    b = case.backbone
    x = b.example_input(2)
    with torch.no_grad():
        out = b.output(x)
    assert out.dim() == 2 and out.shape[0] == 2
    if b.modality == "image":
        assert b.padding_mask(x) is None
        return
    x = b.tokenize(["a small red circle left of a blue square", "a circle"])
    mask = b.padding_mask(x)
    assert mask.dtype == torch.bool and mask.shape == x["input_ids"].shape
    assert mask[0].sum() > mask[1].sum() > 0 and mask[:, 0].all()
    # tokens outside the mask must not change any valid token's features (padding or causal masking)
    noisy = {k: v.clone() for k, v in x.items()}
    noisy["input_ids"][~mask] = 5
    with torch.no_grad():
        clean_f, noisy_f = b.features(x)[-1], b.features(noisy)[-1]
        clean_o, noisy_o = b.output(x), b.output(noisy)
    torch.testing.assert_close(clean_f[mask], noisy_f[mask])
    torch.testing.assert_close(clean_o, noisy_o)


def test_image_transform_matches_probe_size(case: Case) -> None:
    b = case.backbone
    if b.modality != "image":
        pytest.skip("text backbone")
    from PIL import Image

    image = Image.new("RGB", (80, 60), color=(200, 30, 30))
    for train in (False, True):
        t = b.transform(train)(image)
        assert tuple(t.shape) == tuple(b.example_input(1).shape[1:])


def test_open_clip_pair_shares_one_model_and_token_layout() -> None:
    from mdpd_vl.backbones.open_clip import _batch_major, _valid_prefix

    image, text = _shared_clip()
    # one create_model call: each tower holds only its own parameters
    assert not {id(p) for p in image.parameters()} & {id(p) for p in text.parameters()}
    tok = text.tokenize(["a red circle", "a small blue square left of a circle"], max_length=6)
    assert tok["input_ids"].shape == (2, text.context_length) and tok["attention_mask"][1].sum() == 6
    # LND <-> NLD: the wrapper follows the transformer's layout flag, or the shape when it has none
    x = image.example_input(2)
    transformer = image.model.transformer
    with torch.no_grad():
        ref = image.features(x)
        transformer.batch_first = False
        for blk in transformer.resblocks:
            blk.attn.batch_first = False
        try:
            lnd = image.features(x)
        finally:
            transformer.batch_first = True
            for blk in transformer.resblocks:
                blk.attn.batch_first = True
    for a, c in zip(ref, lnd):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    t = torch.randn(5, 3, 4)
    assert _batch_major(t, 3, None).shape == (3, 5, 4) and _batch_major(t, 5, None) is t
    ids = torch.tensor([[49406, 0, 7, 49407, 0, 0]])  # an id equal to pad inside the text stays valid
    assert _valid_prefix(ids, 0).tolist() == [[True, True, True, True, False, False]]


def test_registry_errors() -> None:
    with pytest.raises(UserError, match="valid: .*hf_text"):
        build_backbone({"kind": "nope"})
    with pytest.raises(UserError, match="kind"):
        build_backbone({"name": "x"})
    with pytest.raises(UserError, match="unknown backbone"):
        build_pair("not-a-model")
    with pytest.raises(UserError, match="pretrained"):  # checked before any download is tried
        build_pair("ViT-B-32", pretrained="no-such-tag")
    from mdpd_vl.backbones.timm import TimmCNN

    with pytest.raises(UserError, match="unknown timm model"):
        TimmCNN("no_such_net")


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    from mdpd_vl.backbones.__main__ import main

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for word in (
        "offline_image",
        "open_clip_text",
        "hf_text",
        "timm",
        "DOWNLOADS",
        "no download",
        "ViT-B-32",
    ):
        assert word in out
    assert "demo packages:" in out
