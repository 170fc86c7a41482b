"""The video-text task model (tasks/vtr_model.py) on tiny backbones and tiny generated videos: two
training steps per method with the loss falling and frozen tensors bit-identical, the faded video
encoder (no side module, equal to the backbone path), padded frames, the objectives, the teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_bert, build_tiny_vit
from vtr_helpers import SIDE, tokenize, write_videos

from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import VideoTextDataset
from mdpd_vl.data.transforms import clip_transform
from mdpd_vl.data.video import FrameSampling
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.errors import UserError
from mdpd_vl.heads.retrieval import relational_kl_2d
from mdpd_vl.tasks.vtr_model import VideoTextRetrieval, VTRConfig, auto_pool, build_vtr_model
from mdpd_vl.tuning.config import MethodConfig

METHODS = {
    "linear": MethodConfig(name="linear"),
    "partial": MethodConfig(name="partial"),
    "lora": MethodConfig(name="lora", lora_r=2),
    "unipt": MethodConfig(name="unipt", d=8),
    "sherl": MethodConfig(name="sherl", d=8),
    "lst": MethodConfig(name="lst", d=8),
    "mdpd_head": MethodConfig(name="mdpd", d=8, distill=DistillConfig(d=8, backbone_trainable="head")),
    "mdpd_norms_all": MethodConfig(name="mdpd", d=8, distill=DistillConfig(d=8, backbone_trainable="norms_all",
                                                                         checkpointing=True)),
}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """Six videos (3 to 8 frames at 4 fps, so some are padded), one caption each."""
    root = tmp_path_factory.mktemp("videos")
    index = write_videos(root, n_frames=[8, 3, 6, 4, 8, 5], captions_per_video=1)
    ds = VideoTextDataset(index, clip_transform(SIDE), FrameSampling(max_frames=6), per="video")
    b = Collator(tokenize)([ds[i] for i in range(len(ds))])
    assert not b["frame_mask"].all() and b["frame_mask"].any(1).all()
    return b


def build(method: str, sim: str = "meanP", **vtr) -> VideoTextRetrieval:
    torch.manual_seed(0)
    return build_vtr_model(build_tiny_vit(), build_tiny_bert(), METHODS[method], VTRConfig(sim=sim, **vtr))


def total(model: VideoTextRetrieval, batch: dict) -> float:
    model.eval()  # no dropout: the two measurements compare weights, not noise
    with torch.no_grad():
        value = float(sum(model.losses(batch).values()))
    model.train()
    return value


@pytest.mark.parametrize("method", list(METHODS))
def test_two_steps_lower_the_loss_and_leave_frozen_tensors_alone(method, batch):
    model = build(method, sim="seqTransf" if method == "mdpd_head" else "meanP")
    groups = model.param_groups()
    trained = {id(p) for ps in groups.values() for p in ps}
    assert len(trained) == sum(len(ps) for ps in groups.values())  # disjoint groups
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trained}
    assert not any(p.requires_grad for n, p in model.named_parameters() if id(p) not in trained)
    before = total(model, batch)
    opt = torch.optim.AdamW([p for ps in groups.values() for p in ps], lr=3e-3, weight_decay=0.0)
    for _ in range(2):
        losses = model.losses(batch)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
    assert total(model, batch) < before
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], v) for n, v in frozen.items())
    assert set(groups) >= {"sim", "logit_scale"} and groups["logit_scale"]
    if method.startswith("mdpd"):
        assert {"task", "task_backbone", "cross_relational", "video_shallow", "video_deep", "text_deep"} <= set(losses)
    else:
        assert set(losses) == {"task"}


def test_faded_encoders_have_no_side_module_and_equal_the_backbone_path(batch):
    from mdpd_vl.distill.bottleneck import Bottleneck
    from mdpd_vl.distill.generation import GenerationBlock
    from mdpd_vl.side.base import SideNetwork

    model = build("mdpd_head", sim="seqTransf").eval()
    video_enc, text_enc = model.deployed()
    side_ids = {id(p) for name in ("video.side", "video.distill", "video.side_head", "text.side", "text.distill",
                                   "text.side_head") for p in model.param_groups()[name]}
    for enc in (video_enc, text_enc):
        assert not any(isinstance(m, (SideNetwork, Bottleneck, GenerationBlock)) for m in enc.modules())
        assert not any(id(p) in side_ids for p in enc.parameters())
    with torch.no_grad():
        tower = model.video_tower(batch["video"], batch["frame_mask"])
        expect = model.sim(tower.y_backbone, batch["frame_mask"])
        assert torch.allclose(video_enc(batch["video"], batch["frame_mask"]), expect, atol=1e-5)
        assert torch.allclose(text_enc(batch["text"]), model.text.core(batch["text"]).y_backbone, atol=1e-5)
        kept_video, kept_text = model.deployed(side_kept=True)
        assert torch.allclose(kept_video(batch), model.sim(tower.y, batch["frame_mask"]), atol=1e-5)
        assert torch.allclose(kept_text(batch["text"]), model.text.core(batch["text"]).y_side, atol=1e-5)
    assert model.inference_params(side_kept=True) > model.inference_params()
    assert model.inference_params() == sum(p.numel() for p in video_enc.parameters()) + \
        sum(p.numel() for p in text_enc.parameters())
    with pytest.raises(ValueError, match="mdpd only"):
        build("lora").deployed(side_kept=True)


@pytest.mark.parametrize("sim", ["meanP", "seqTransf"])
def test_a_padded_frame_changes_nothing(sim, batch):
    model = build("mdpd_head", sim=sim).eval()
    padded = {**batch, "video": torch.cat([batch["video"], torch.randn_like(batch["video"][:, :1]) * 50], 1),
              "frame_mask": torch.cat([batch["frame_mask"], torch.zeros_like(batch["frame_mask"][:, :1])], 1)}
    video_enc, _ = model.deployed()
    with torch.no_grad():
        assert torch.allclose(video_enc(padded), video_enc(batch), atol=1e-5)
        a, b = model.losses(batch), model.losses(padded)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_paper_objective_is_one_switch_away(batch):
    model = build("mdpd_head", objective="paper")
    losses = model.losses(batch)
    assert "task_backbone" not in losses and "cross_relational" not in losses
    assert {"task", "video_logits", "text_logits"} <= set(losses)  # per-tower logits MSE (paper eq. 3)
    with pytest.raises(UserError, match="objective"):
        VTRConfig(objective="both")
    with pytest.raises(UserError, match="sim: unknown similarity head 'tight'; valid: meanP, seqTransf"):
        VTRConfig(sim="tight")
    from dataclasses import dataclass, field

    from mdpd_vl.engine.config import load_config

    @dataclass
    class Run:
        vtr: VTRConfig = field(default_factory=VTRConfig)

    with pytest.raises(UserError, match=r"^--set vtr.sim=tight: vtr.sim: unknown similarity head"):
        load_config(Run, None, ["vtr.sim=tight"])  # the loader names the section once


def test_cross_relational_uses_the_dual_path_teacher_when_there_is_one(batch):
    model = build("mdpd_head").eval()
    with torch.no_grad():
        plain = model.losses(batch)
        tower_v = model.video_tower(batch["video"], batch["frame_mask"])
        tower_t = model.text.core(batch["text"])
        side = torch.nn.functional.normalize
        teacher_sims = side(tower_t.y_side, dim=-1) @ side(model.sim(tower_v.y, batch["frame_mask"]), dim=-1).t()
        student = side(tower_t.y_backbone, dim=-1) @ side(model.sim(tower_v.y_backbone, batch["frame_mask"]), dim=-1).t()
        assert torch.allclose(plain["cross_relational"], relational_kl_2d(teacher_sims, student, 0.05), atol=1e-5)

    torch.manual_seed(3)
    fake = {}
    for tower in (model.video, model.text):
        forward = tower.core.forward

        def with_teacher(x, task_loss=None, _f=forward):
            out = _f(x, task_loss)
            out.y_teacher = fake.setdefault(out.y_side.shape, torch.randn_like(out.y_side))
            return out

        tower.core.forward = with_teacher
    with torch.no_grad():
        taught = model.losses(batch)
        t_video = model.sim(model.video_tower(batch["video"], batch["frame_mask"]).y_teacher, batch["frame_mask"])
        t_sims = side(fake[tower_t.y_side.shape], dim=-1) @ side(t_video, dim=-1).t()
    assert torch.allclose(taught["cross_relational"], relational_kl_2d(t_sims, student, 0.05), atol=1e-5)
    assert not torch.allclose(taught["cross_relational"], plain["cross_relational"])


def test_same_video_captions_can_be_masked(batch):
    model = build("linear", mask_same_video=True).eval()
    dup = {**batch, "video_index": torch.tensor([0, 0, 1, 2, 3, 4])}
    with torch.no_grad():
        assert not torch.allclose(model.losses(dup)["task"], model.losses(batch)["task"])


def test_init_report_pools_and_seq_transf_from_a_clip_text_tower():
    from mdpd_vl.backbones.open_clip import OpenClipText

    torch.manual_seed(0)
    kw = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
              text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=2))
    text = OpenClipText("ViT-B-32", **kw)
    image = build_tiny_vit()
    assert auto_pool(image) == "cls" and auto_pool(text) == "last" and auto_pool(build_tiny_bert()) == "cls"
    model = build_vtr_model(image, text, METHODS["mdpd_head"], VTRConfig(sim="seqTransf", seq_layers=3))
    assert model.init_report["embed_dim"] == 16
    assert model.init_report["seq_transf"] == {"layers": 2, "positions": 8}
    assert model.init_report["projection"] == {"video": True, "text": True}
    assert model.sim.blocks[0].attn.num_heads == 2
    assert torch.equal(model.text.core.head_backbone.proj.weight, text.model.text_projection.detach().t())
    b = model.example_batch(2, 3)
    assert b["video"].shape == (2, 3, 3, 32, 32) and set(model.losses(b)) >= {"task", "cross_relational"}


def test_the_engine_trains_it_from_video_files_in_workers(tmp_path):
    from mdpd_vl.engine.config import TrainConfig
    from mdpd_vl.engine.train import train

    index = write_videos(tmp_path, n_frames=[8, 3, 6, 4, 8, 5], captions_per_video=2)
    ds = VideoTextDataset(index, clip_transform(SIDE), FrameSampling(max_frames=4), per="video",
                          cache=tmp_path / "cache")
    model = build("mdpd_head")
    seen = {"skipped": 0, "decode": 0.0}

    def step_fn(m: VideoTextRetrieval, b: dict, step: int) -> dict:
        seen["skipped"] += b["skipped"]
        seen["decode"] += float(b["decode_seconds"].sum())
        losses = m.losses(b)
        return {"loss": sum(losses.values()), **losses}

    groups = [{"name": k, "params": v} for k, v in model.param_groups().items() if v]
    cfg = TrainConfig(max_steps=2, batch_size=3, lr=1e-3, num_workers=1, ckpt_every=0, log_every=1)
    result = train(model, step_fn, ds, Collator(tokenize), groups, cfg, tmp_path / "run", resume=None, progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert seen["skipped"] == 0 and seen["decode"] > 0
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 6  # the workers filled the frame cache


def test_the_deployed_pieces_export_and_rebuild_from_their_specs(batch, tmp_path):
    from mdpd_vl.export import build_head, export_faded, load_exported
    from mdpd_vl.heads.clip4clip import VideoEncoder

    model = build("mdpd_head", sim="seqTransf").eval()
    video_enc, text_enc = model.deployed()
    export_faded(video_enc.frame_encoder, tmp_path / "video")
    export_faded(text_enc, tmp_path / "text")
    sim = build_head(model.sim.spec())
    sim.load_state_dict(model.sim.state_dict())
    again = VideoEncoder(load_exported(tmp_path / "video"), sim.eval())
    with torch.no_grad():
        assert torch.allclose(again(batch), video_enc(batch), atol=1e-6)
        assert torch.allclose(load_exported(tmp_path / "text")(batch["text"]), text_enc(batch["text"]), atol=1e-6)


def test_only_plain_deployments_are_exportable() -> None:
    """Faded MDPD, merged LoRA and head-only methods export; inserted adapters and side networks
    change the backbone's architecture, which the backbone's spec would rebuild without them."""
    from mdpd_vl.export import is_plain

    adapter = MethodConfig(name="adapter", adapter_dim=4)
    for method, plain in (("mdpd_head", True), ("lora", True), ("linear", True), ("adapter", False),
                          ("unipt", False)):
        cfg = adapter if method == "adapter" else METHODS[method]
        video, text = build_vtr_model(build_tiny_vit(), build_tiny_bert(), cfg, VTRConfig()).deployed()
        assert is_plain(video.frame_encoder) == plain and is_plain(text) == plain, method


def test_head_layers_per_tower_names_the_video_and_text_towers() -> None:
    from mdpd_vl.heads.pooling import LayerPoolHead
    from mdpd_vl.tasks.vtr_model import backbone_head

    def method(head_layers: dict) -> MethodConfig:
        return MethodConfig(name="mdpd", d=8, distill=DistillConfig(d=8, backbone_trainable="head",
                                                                    head_layers=head_layers))

    model = build_vtr_model(build_tiny_vit(), build_tiny_bert(), method({"video": "last_2"}), VTRConfig())
    assert isinstance(backbone_head(model.video), LayerPoolHead)
    assert not isinstance(backbone_head(model.text), LayerPoolHead)
    with pytest.raises(UserError, match="head_layers.*image.*video, text"):
        build_vtr_model(build_tiny_vit(), build_tiny_bert(), method({"image": "last_2"}), VTRConfig())
