"""Grounding on the dual-path core: both placements of the side network on tiny backbones and tiny referring
expressions of the shapes world (written in refer's format, read by the real prep), 2-step training per method
with the task loss falling and frozen tensors bit-identical, the faded model without side modules, placement B
from a checkpoint that a `full` run wrote, the official MDETR key layout, bad boxes counted, the PNG of examples."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_bert, build_tiny_cnn
from torch import nn

from mdpd_vl.backbones.mdetr import MdetrBackbone, load_mdetr, official_keys
from mdpd_vl.data.datasets import GroundingDataset
from mdpd_vl.data.transforms import GroundingTransform
from mdpd_vl.distill.bottleneck import Bottleneck
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.distill.generation import GenerationBlock
from mdpd_vl.errors import UserError
from mdpd_vl.eval.grounding import draw_examples, grounding_report
from mdpd_vl.heads.grounding import GroundingConfig, MdetrCore
from mdpd_vl.side.base import SideNetwork
from mdpd_vl.tasks.vg_model import (
    GroundingCollator,
    VGConfig,
    backbones_placement,
    load_pretrained,
    predict,
    transformer_placement,
)
from mdpd_vl.tuning import MethodConfig

SIZE = 64  # the tiny CNN's input: a 2 x 2 grid at its last stage
SPECIAL = (1, 2)  # [CLS], [SEP] of the word tokenizer below
TINY = dict(d_model=32, nheads=2, enc_layers=2, dec_layers=2, dim_feedforward=64, num_queries=5, num_tokens=16,
            dropout=0.0)


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in for the tiny BERT's tokenizer: [CLS] one id per word [SEP], right-padded with 0 (vocab 40)."""
    rows = [[1, *[sum(map(ord, w)) % 37 + 3 for w in t.lower().split()], 2] for t in texts]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """A few shapes-world scenes with referring expressions, through refer's format and the real prep."""
    from mdpd_vl.data.prep import refcoco
    from mdpd_vl.data.shapes_formats import write_refcoco
    from mdpd_vl.data.shapes_scenes import sample_free_scene
    from mdpd_vl.data.shapes_text import referring_expressions

    root = tmp_path_factory.mktemp("refs")
    rng, entries = np.random.default_rng(0), []
    for image_id, split in enumerate(["train"] * 3 + ["val"] * 2, start=1):
        for _ in range(100):
            scene = sample_free_scene(rng, SIZE, min_things=2)
            targets = [(i, referring_expressions(scene, i, rng, SIZE, k=1)) for i in range(len(scene.placed))]
            if targets := [(i, s) for i, s in targets if s]:
                break
        entries.append((scene, image_id, split, targets))
    write_refcoco(root / "raw", entries, SIZE)
    refcoco.prepare(root / "raw", root / "refcoco", variant="refcoco", split_by="unc", force=True, name="shapes",
                    workers=1)
    return root / "refcoco"


@pytest.fixture(scope="module")
def batch(refs) -> dict:
    ds = GroundingDataset(refs / "train.index.json", GroundingTransform(SIZE))
    return GroundingCollator(tokenize, SPECIAL)([ds[i] for i in range(min(6, len(ds)))])


def placement_a(method: str, **distill) -> nn.Module:
    torch.manual_seed(0)
    cfg = MethodConfig(name=method, d=16, distill=DistillConfig(d=8, **distill))
    return backbones_placement(build_tiny_cnn(), build_tiny_bert(), cfg, GroundingConfig(**TINY))


def task_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        losses = model.losses(batch)
    model.train()
    return float(sum(v for k, v in losses.items() if k.startswith("task")))


def side_buffers(model: nn.Module) -> set[int]:
    """The buffers a side network owns (UniPT's / SHERL's CNN-form BatchNorm statistics): trainable-side state
    that moves in train mode as in the official code (VSE-infty `train_start()` trains the whole image encoder,
    side module included). Backbone modules that SHERL re-runs are not registered in it, so they stay checked."""
    return {id(b) for m in model.modules() if isinstance(m, SideNetwork) for b in m.buffers()}


def frozen_state(model) -> dict[str, torch.Tensor]:
    """Every parameter outside the trained groups, and every buffer but the side networks' own, cloned."""
    trained = {id(p) for group in model.param_groups().values() for p in group}
    out = {f"p:{n}": p.detach().clone() for n, p in model.named_parameters() if id(p) not in trained}
    side = side_buffers(model)
    out.update({f"b:{n}": b.clone() for n, b in model.named_buffers() if id(b) not in side})
    return out


def train_steps(model, batch, steps: int = 2, lr: float = 1e-3) -> tuple[float, float, dict[str, torch.Tensor]]:
    groups = [{"params": p} for p in model.param_groups().values() if p]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    before = task_loss(model, batch)
    model.train()
    for _ in range(steps):
        losses = model.losses(batch)
        opt.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
        opt.step()
    return before, task_loss(model, batch), losses


def side_modules(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if isinstance(m, (SideNetwork, Bottleneck, GenerationBlock))]


A_METHODS = {
    "linear": {}, "partial": {}, "lora": {}, "unipt": {}, "sherl": {}, "lst": {},
    "mdpd-head": {"backbone_trainable": "head"},
    "mdpd-norms_all": {"backbone_trainable": "norms_all", "checkpointing": True},
}


@pytest.mark.parametrize("name", list(A_METHODS))
def test_placement_a_two_steps(name, batch):
    model = placement_a(name.split("-")[0], **A_METHODS[name])
    frozen = frozen_state(model)
    side_stats = {n: b.clone() for n, b in model.named_buffers() if id(b) in side_buffers(model)}
    before, after, losses = train_steps(model, batch)
    assert after < before, (before, after)
    assert all(torch.isfinite(v) for v in losses.values())
    now = frozen_state(model)
    changed = [k for k, v in frozen.items() if not torch.equal(v, now[k])]
    assert not changed, changed[:5]
    if name.split("-")[0] in ("unipt", "mdpd"):  # the CNN form's side BatchNorm trains in train mode (official)
        live = dict(model.named_buffers())
        assert side_stats and any(not torch.equal(v, live[n]) for n, v in side_stats.items())
    # the trained groups did train
    assert any(g and any(p.grad is not None for p in g) for g in model.param_groups().values())
    if name.startswith("mdpd"):
        assert {"task", "task_backbone", "logits", "image_shallow", "image_deep", "text_deep"} <= set(losses)
        deployed = model.deployed()
        assert not side_modules(deployed) and model.head_side not in list(deployed.modules())
        assert side_modules(model.deployed(side_kept=True))
        bare = placement_a("linear").deployed()
        assert model.inference_params == sum(p.numel() for p in bare.parameters())  # what the bare model costs
        boxes, scores = deployed.ground(batch["image"], batch["text"], batch["orig_size"])
        assert boxes.shape == (len(scores), 4) and ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.parametrize("objective", ["match", "mse", "none"])
def test_logits_distillation_switch(objective, batch):
    torch.manual_seed(0)
    cfg = MethodConfig(name="mdpd", d=16, distill=DistillConfig(d=8, backbone_trainable="head"))
    model = backbones_placement(build_tiny_cnn(), build_tiny_bert(), cfg, GroundingConfig(**TINY),
                                VGConfig(logits=objective, task_on_backbone=objective != "none"))
    losses = model.losses(batch)
    assert ("logits" in losses) == (objective != "none")
    assert ("task_backbone" in losses) == (objective != "none")
    if objective != "none":
        losses["logits"].backward()
        grads = [p.grad for p in model.head.parameters() if p.grad is not None]
        assert grads and all(p.grad is None for p in model.head_side.parameters())  # the side path teaches


@pytest.mark.parametrize("ema", [None, 0.9])
def test_teacher_is_the_ema_copy_or_the_live_side_path(ema, batch):
    model = placement_a("mdpd", backbone_trainable="head", ema_teacher=ema)
    calls = []
    model.head_side.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    losses = model.losses(batch)
    # the live side path teaches with its own prediction; an EMA teacher runs W_S once more, without grad
    assert calls == ([True] if ema is None else [True, False])
    losses["logits"].backward()
    assert any(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None for p in model.head_side.parameters())


def test_alternate_schedule_is_refused():
    with pytest.raises(UserError, match="schedule"):
        placement_a("mdpd", schedule="alternate")


# -- placement B ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory, batch) -> tuple[Path, torch.Tensor]:
    """A short `full` run (placement A) writes an MDETR checkpoint; returns it and the run's predicted boxes."""
    model = placement_a("full")
    train_steps(model, batch)
    folder = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "mdetr")
    boxes, _ = model.deployed().ground(batch["image"], batch["text"], batch["orig_size"])
    return folder, boxes


def test_full_checkpoint_reloads_exactly(full_checkpoint, batch):
    folder, boxes = full_checkpoint
    model = load_pretrained(folder, MethodConfig(name="linear"))
    again, _ = model.deployed().ground(batch["image"], batch["text"], batch["orig_size"])
    assert torch.equal(again, boxes)
    assert json.loads((folder / "config.json").read_text())["extra"]["method"] == "full"


@pytest.mark.parametrize("side", ["unipt", "sherl", "lst"])
def test_placement_b_mdpd_fine_tunes_the_checkpoint(side, full_checkpoint, batch, tmp_path):
    folder, _ = full_checkpoint
    torch.manual_seed(0)
    cfg = MethodConfig(name="mdpd", side_network=side, distill=DistillConfig(d=8, backbone_trainable="norms_all"))
    model = load_pretrained(folder, cfg, GroundingConfig(**TINY))
    backbone = model.tuned.backbone
    assert isinstance(backbone, MdetrBackbone) and backbone.num_layers == TINY["enc_layers"] + TINY["dec_layers"] + 1
    frozen = frozen_state(model)
    before, after, losses = train_steps(model, batch)
    assert after < before and {"task", "task_backbone", "logits", "shallow", "deep"} <= set(losses)
    now = frozen_state(model)
    assert not [k for k, v in frozen.items() if not torch.equal(v, now[k])]
    trained = {id(p) for p in model.param_groups()["backbone_norms"]}
    assert trained and all(id(p) not in trained for p in backbone.image.parameters())  # only transformer norms
    deployed = model.deployed()
    assert not side_modules(deployed) and side_modules(model.deployed(side_kept=True))
    # the faded model is an MDETR again: written, reloaded, the same boxes
    boxes, _ = deployed.ground(batch["image"], batch["text"], batch["orig_size"])
    model.save_pretrained(tmp_path / "faded")
    reloaded = load_pretrained(tmp_path / "faded", MethodConfig(name="linear")).deployed()
    assert torch.equal(reloaded.ground(batch["image"], batch["text"], batch["orig_size"])[0], boxes)


@pytest.mark.parametrize("method", ["linear", "partial", "lora", "unipt", "sherl", "lst"])
def test_placement_b_methods_two_steps(method, full_checkpoint, batch):
    folder, _ = full_checkpoint
    torch.manual_seed(0)
    model = load_pretrained(folder, MethodConfig(name=method), GroundingConfig(**TINY))
    frozen = frozen_state(model)
    before, after, _ = train_steps(model, batch)
    assert after < before
    now = frozen_state(model)
    assert not [k for k, v in frozen.items() if not torch.equal(v, now[k])]


def test_side_kept_models_cannot_be_saved_as_mdetr(full_checkpoint, tmp_path):
    model = load_pretrained(full_checkpoint[0], MethodConfig(name="unipt"))
    with pytest.raises(UserError, match="not a plain MDETR"):
        model.save_pretrained(tmp_path / "x")


# -- the MDETR backbone -------------------------------------------------------------------------------
def tiny_mdetr(num_queries: int = 5) -> MdetrBackbone:
    torch.manual_seed(0)
    image, text = build_tiny_cnn(), build_tiny_bert()
    core = MdetrCore(image.widths[-1], text.widths[-1], GroundingConfig(**{**TINY, "num_queries": num_queries}))
    return MdetrBackbone(image, text, core)


def test_mdetr_backbone_protocol():
    from mdpd_vl.backbones import build_backbone

    bb = tiny_mdetr().eval()
    x = bb.example_input(3)
    feats = bb.features(x)
    n_img = bb.image_tokens(x["images"])
    n_enc = n_img + x["text"]["input_ids"].shape[1]
    assert [f.shape[1] for f in feats] == [n_enc] * 2 + [5] * 3 and bb.widths == [32] * 5
    assert bb.padding_mask(x).shape == (3, n_enc) and bb.padding_mask(x)[:, :n_img].all()
    assert torch.equal(bb.padding_mask(x)[:, n_img:], x["text"]["attention_mask"].bool())
    norms = {id(p) for _, p in bb.norm_parameters()}
    assert norms and not norms & {id(p) for p in [*bb.image.parameters(), *bb.text.parameters()]}
    assert build_backbone(json.loads(json.dumps(bb.spec()))).widths == bb.widths
    bb.set_checkpointing(True)
    assert all(torch.equal(a, b) for a, b in zip(feats, bb.features(x)))
    # probing a new input size keeps every module's mode (frozen BatchNorm inside a training model stays frozen)
    bb.train()
    bn = bb.image.model.bn1
    bn.eval()
    big = {"images": torch.randn(1, 3, 2 * SIZE, 2 * SIZE), "text": {k: v[:1] for k, v in x["text"].items()}}
    assert bb.padding_mask(big).shape[1] == 4 * n_img + x["text"]["input_ids"].shape[1]
    assert not bn.training and bb.image.training


@pytest.mark.parametrize("name", ["unipt", "sherl"])
def test_side_networks_fuse_layers_of_other_token_counts(name):
    """MDETR's layers hold the memory (image + text tokens) then the queries: the memory layers are gathered onto
    the queries by cross-attention (their padding masked), each s_l keeps b_l's token count."""
    from mdpd_vl.side import build_side
    from mdpd_vl.side.unipt import cross_gather, gather_onto

    bb = tiny_mdetr().eval()
    x = bb.example_input(3)
    x["text"]["attention_mask"][1, 3:] = 0  # padded text: the memory's mask has False entries
    side = build_side(name, bb.layer_specs, {"r": 2}, backbone=bb).eval()  # SHERL's fc_out has dropout
    with torch.no_grad():
        feats = bb.features(x, with_input=side.reads_input)
    emb = feats.pop(0) if side.reads_input else None
    valid = bb.padding_mask(x)
    out = side(feats, valid, emb)
    assert [s.shape[1] for s in out.layers] == [f.shape[1] for f in feats]
    assert out.tokens.shape == (3, TINY["num_queries"], 32)
    assert len({f.shape[1] for f in feats[: side.reads_layers]}) == 2  # memory and queries are both read
    probe = torch.randn(out.tokens.shape, generator=torch.Generator().manual_seed(0))
    (out.tokens * probe).sum().backward()  # not a plain sum: SHERL's output is a re-run LayerNorm (decoder.norm)
    projections = side.hor if name == "sherl" else side.down  # per source: b_0 (when read), b_1, ...
    first = 1 if side.reads_input else 0
    for i in range(bb.num_encoder_layers):  # every memory layer reaches the output in the query layout
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections[first + i].parameters()), i
    # the padded memory tokens change nothing
    moved = [f.clone() for f in feats]
    for f in moved[: bb.num_encoder_layers]:
        f[~valid] = 1e3
    with torch.no_grad():
        assert torch.allclose(side(moved, valid, emb).tokens, side(feats, valid, emb).tokens, atol=1e-5)
    # equal counts: UniPT's + I / SHERL's token by token; other counts: the gather alone
    a, t, m = torch.randn(2, 5, 8), torch.randn(2, 12, 8), torch.rand(2, 12) > 0.3
    assert torch.equal(gather_onto(a, t, m, identity=True), cross_gather(a, t, m))
    t5 = torch.randn(2, 5, 8)
    assert torch.equal(gather_onto(a, t5, None, identity=True), cross_gather(a, t5, None) + t5)
    assert torch.equal(gather_onto(a, t5, None, identity=False), t5)


def test_memory_length_never_equals_the_query_count():
    probe = tiny_mdetr()
    x = probe.example_input(2)
    n_enc = probe.image_tokens(x["images"]) + x["text"]["input_ids"].shape[1]
    bb = tiny_mdetr(num_queries=n_enc).eval()  # the collision: one padding token is appended
    feats = bb.features(x)
    assert feats[0].shape[1] == n_enc + 1 and feats[-1].shape[1] == n_enc
    assert bb.padding_mask(x).shape == (2, n_enc + 1) and not bb.padding_mask(x)[:, -1].any()


def _official_state(image: nn.Module, text: nn.Module, cfg: GroundingConfig, text_width: int) -> dict:
    """A state dict with the key names of ashkamath/mdetr's MDETR (models/mdetr.py, transformer.py, backbone.py),
    written out from the official module structure (not from this project's), with random values."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    d, ff, c = cfg.d_model, cfg.dim_feedforward, 512
    # the ResNet's own (random) init, from another instance than the one load_mdetr builds; random N(0, 1)
    # convolutions would overflow through 18 layers
    sd = {f"backbone.0.body.{k}": v.clone() for k, v in image.state_dict().items()
          if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}  # FrozenBatchNorm2d: no counter
    sd.update({f"transformer.text_encoder.{k}": v.clone() for k, v in text.state_dict().items()})
    sd["transformer.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # old transformers kept it

    def attn(prefix):
        return {f"{prefix}.in_proj_weight": rand(3 * d, d), f"{prefix}.in_proj_bias": rand(3 * d),
                f"{prefix}.out_proj.weight": rand(d, d), f"{prefix}.out_proj.bias": rand(d)}

    def ffn_norms(prefix, norms):
        out = {f"{prefix}.linear1.weight": rand(ff, d), f"{prefix}.linear1.bias": rand(ff),
               f"{prefix}.linear2.weight": rand(d, ff), f"{prefix}.linear2.bias": rand(d)}
        for n in norms:
            out.update({f"{prefix}.{n}.weight": rand(d), f"{prefix}.{n}.bias": rand(d)})
        return out

    for i in range(cfg.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        sd.update({**attn(f"{p}.self_attn"), **ffn_norms(p, ["norm1", "norm2"])})
    for i in range(cfg.dec_layers):
        p = f"transformer.decoder.layers.{i}"
        sd.update({**attn(f"{p}.self_attn"), **attn(f"{p}.cross_attn_image"),
                   **ffn_norms(p, ["norm1", "norm3", "norm4"])})
    sd.update({"transformer.decoder.norm.weight": rand(d), "transformer.decoder.norm.bias": rand(d),
               "transformer.resizer.fc.weight": rand(d, text_width), "transformer.resizer.fc.bias": rand(d),
               "transformer.resizer.layer_norm.weight": rand(d), "transformer.resizer.layer_norm.bias": rand(d),
               "input_proj.weight": rand(d, c, 1, 1), "input_proj.bias": rand(d),
               "query_embed.weight": rand(cfg.num_queries, d),
               "class_embed.weight": rand(cfg.num_tokens + 1, d), "class_embed.bias": rand(cfg.num_tokens + 1),
               "contrastive_align_projection_image.weight": rand(64, d),
               "contrastive_align_projection_text.weight": rand(64, d)})
    for k, (i, o) in enumerate([(d, d), (d, d), (d, 4)]):
        sd.update({f"bbox_embed.layers.{k}.weight": rand(o, i), f"bbox_embed.layers.{k}.bias": rand(o)})
    return sd


def test_official_mdetr_checkpoint_maps_key_by_key(tmp_path, batch):
    import timm

    from mdpd_vl.backbones.hf import HFText

    cfg = GroundingConfig(**TINY)
    roberta = dict(model_type="roberta", vocab_size=50, hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=48, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)
    text = HFText(config=roberta)
    state = _official_state(timm.create_model("resnet18"), text.model, cfg, 24)
    args = argparse.Namespace(backbone="resnet18", nheads=2, dropout=0.0, pre_norm=False, text_encoder_type="x")
    path = tmp_path / "mdetr.pth"
    torch.save({"model": state, "model_ema": state, "args": args, "epoch": 3}, path)
    backbone, head = load_mdetr(path, text_backbone=text)
    core = backbone.core
    assert core.cfg.enc_layers == 2 and core.cfg.num_queries == 5 and core.cfg.num_tokens == 16
    checks = {
        "transformer.encoder.layers.1.self_attn.in_proj_weight": core.encoder.layers[1].self_attn.in_proj_weight,
        "transformer.decoder.layers.0.cross_attn_image.out_proj.weight":
            core.decoder.layers[0].cross_attn_image.out_proj.weight,
        "transformer.decoder.layers.1.norm4.bias": core.decoder.layers[1].norm4.bias,
        "transformer.decoder.norm.weight": core.decoder.norm.weight,
        "transformer.resizer.layer_norm.weight": core.resizer.layer_norm.weight,
        "query_embed.weight": core.query_embed.weight,
        "class_embed.bias": head.class_embed.bias,
        "bbox_embed.layers.2.weight": head.bbox_embed.layers[2].weight,
        "backbone.0.body.layer3.1.conv2.weight": backbone.image.model.layer3[1].conv2.weight,
    }
    for key, tensor in checks.items():
        assert torch.equal(state[key], tensor.detach()), key
    assert torch.equal(state["input_proj.weight"].flatten(1), core.input_proj.weight.detach())
    _, dropped = official_keys(state)
    assert sorted(dropped) == ["contrastive_align_projection_image.weight",
                               "contrastive_align_projection_text.weight"]
    model = transformer_placement(backbone, head, MethodConfig(name="linear"))
    x = {"image": torch.randn(2, 3, SIZE, SIZE), "text": {"input_ids": torch.randint(3, 50, (2, 6)),
                                                          "attention_mask": torch.ones(2, 6, dtype=torch.long)}}
    boxes, _ = model.deployed().ground(x["image"], x["text"], torch.tensor([[SIZE, SIZE]] * 2))
    assert torch.isfinite(boxes).all()
    del state["transformer.decoder.layers.1.norm4.bias"]
    torch.save({"model": state, "args": args}, path)
    with pytest.raises(UserError, match="norm4"):
        load_mdetr(path, text_backbone=text)
    torch.save({"model": state, "args": argparse.Namespace(backbone="timm_tf_efficientnet_b3_ns")}, path)
    with pytest.raises(UserError, match="not supported"):
        load_mdetr(path, text_backbone=text)
    with pytest.raises(UserError, match="not found"):
        load_mdetr(tmp_path / "nothing.pth")


# -- data -----------------------------------------------------------------------------------------
def test_bad_boxes_are_counted_not_fatal(refs, tmp_path):
    """Two guarantees: a canonical index never holds a box that is not 4 finite numbers (the prep skips and counts
    such annotations, tests/test_faults_prep.py; `load_index` refuses a file that has one), and the dataset counts
    what a valid index may still hold: boxes outside the image (clipped), degenerate boxes, items without a usable
    image size, blank sentences, missing images."""
    data = json.loads((refs / "train.index.json").read_text())
    good = data["items"][0]
    w = good["width"]
    bad = [
        {**good, "bbox_xyxy": [-5.0, 2.0, w + 10.0, 20.0]},  # outside: clipped, kept
        {**good, "bbox_xyxy": [10.0, 10.0, 10.0, 30.0]},  # zero width: skipped
        {**good, "bbox_xyxy": [w + 1.0, 5.0, w + 9.0, 9.0]},  # wholly outside: degenerate after clipping
        {**good, "width": 0},  # no positive image size: the box cannot be placed (no annotation)
        {**good, "sentence": "  "},
        {**good, "image": "COCO_train2014_999999999999.jpg"},  # missing image
    ]
    data["items"] = [good, *bad]
    data["media_root"] = str((refs / data["media_root"]).resolve())  # the copy lives elsewhere
    path = tmp_path / "train.index.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="missing_image 1"):
        ds = GroundingDataset(path, GroundingTransform(SIZE))
    assert ds.problems == {"clipped": 1, "degenerate": 2, "no_annotation": 1, "blank_sentence": 1,
                           "missing_image": 1}
    for box in (None, [1.0, 2.0, float("nan"), 4.0], [1.0, 2.0, 3.0]):  # never in a canonical index
        path.write_text(json.dumps({**data, "items": [good, {**good, "bbox_xyxy": box}]}))
        with pytest.raises(UserError, match="4 finite numbers") as info:
            GroundingDataset(path)
        assert info.value.field == "items[1].bbox_xyxy" and "\n" not in str(info.value)
    # an index given as a dict is not re-validated: the dataset still counts such a box instead of failing
    with pytest.warns(UserWarning, match="no_annotation 1"):
        loose = GroundingDataset({**data, "items": [good, {**good, "bbox_xyxy": None}]}, check_images=False)
    assert len(loose) == 1
    assert len(ds) == 2 and ds.items[1]["bbox_xyxy"] == [0.0, 2.0, float(w), 20.0]
    b = GroundingCollator(tokenize, SPECIAL)([ds[0], ds[1]])
    assert b["box"].shape == (2, 4) and (b["box"] >= 0).all() and (b["box"] <= 1).all()
    assert not b["expression_mask"][:, 0].any()  # [CLS] is no part of the expression
    assert b["expression_mask"].sum(1).tolist() == [len(ds[0]["sentence"].split())] * 2
    data["items"] = bad[1:]
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="no usable"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GroundingDataset(path)


def test_cautious_crop_keeps_the_box():
    from PIL import Image

    torch.manual_seed(0)
    tf = GroundingTransform(SIZE, train=True, crop_prob=1.0, min_crop=0.3)
    img = Image.new("RGB", (200, 100))
    box = torch.tensor([0.7, 0.4, 0.2, 0.3])
    for _ in range(20):
        x, b, s = tf(img, box, "the left one")
        assert x.shape == (3, SIZE, SIZE) and s == "the left one"
        x1, y1, x2, y2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        assert x1 >= -1e-6 and y1 >= -1e-6 and x2 <= 1 + 1e-6 and y2 <= 1 + 1e-6
        assert b[2] >= box[2] - 1e-6 and b[3] >= box[3] - 1e-6  # a crop only enlarges the normalised box
    ev = GroundingTransform(SIZE)
    assert torch.equal(ev(img, box, "a")[1], box)


def test_predict_report_and_examples_png(refs, tmp_path):
    from PIL import Image

    model = placement_a("linear")
    ds = GroundingDataset(refs / "val.index.json", GroundingTransform(SIZE), strict=True)
    collate = GroundingCollator(tokenize, SPECIAL)
    batches = [collate([ds[i] for i in range(k, min(k + 4, len(ds)))]) for k in range(0, len(ds), 4)]
    out = predict(model.deployed(), batches)
    assert out["pred_xyxy"].shape == out["gt_xyxy"].shape == (len(ds), 4)
    report = grounding_report(out["pred_xyxy"], out["gt_xyxy"], ["refcoco/val"] * len(ds))
    assert report["refcoco/val"]["count"] == len(ds)
    assert report["refcoco/val"]["precision_giou"] <= report["refcoco/val"]["precision_iou"]
    images = [ds.media(ds.items[i]["image"]) for i in range(len(ds))]
    reps = -(-12 // len(ds))
    png = draw_examples((images * reps)[:12], (out["sentences"] * reps)[:12], out["pred_xyxy"].repeat(reps, 1)[:12],
                        out["gt_xyxy"].repeat(reps, 1)[:12], tmp_path / "examples.png")
    sheet = np.asarray(Image.open(png))
    assert sheet.shape[1] == 4 * 256 and sheet.shape[0] == 3 * (256 + 46)
    assert ((sheet[..., 0] > 200) & (sheet[..., 1] < 30)).any()  # a red (predicted) box is drawn
    assert ((sheet[..., 1] > 150) & (sheet[..., 0] < 30)).any()  # and a green (ground-truth) one


def test_engine_trains_the_grounding_model(batch, tmp_path):
    from mdpd_vl.engine.config import TrainConfig
    from mdpd_vl.engine.train import train

    model = placement_a("mdpd", backbone_trainable="head")
    samples = [{k: (v[i] if isinstance(v, (torch.Tensor, list)) and k != "text" else None) for k, v in batch.items()}
               for i in range(len(batch["sentence"]))]
    samples = [{k: v for k, v in s.items() if k in ("image", "box", "sentence", "orig_size", "bbox_xyxy")}
               for s in samples]

    def step_fn(m, b, step):
        losses = m.losses(b)
        return {"loss": torch.stack(list(losses.values())).sum(), **losses}

    groups = [{"name": n, "params": p} for n, p in model.param_groups().items() if p]
    cfg = TrainConfig(max_steps=2, batch_size=3, lr=1e-3, log_every=1, ckpt_every=0)
    result = train(model, step_fn, samples, GroundingCollator(tokenize, SPECIAL), groups, cfg, tmp_path / "run",
                   resume=None, progress=False)
    assert result.step == 2 and all(np.isfinite(result.losses))
