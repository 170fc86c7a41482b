"""Video-text retrieval (CLIP4Clip) on top of any tuning method, MDPD's dual path included.

The video tower is a `TunedModel` over the IMAGE backbone run per frame: the valid frames of a
`B x T` batch go through it as one batch of `N <= B*T` images (so the side network, the dual path
and its distillation losses work per frame), the per-frame embeddings are put back in place, and
the similarity head (`meanP` / `seqTransf`, `heads/clip4clip.py`) makes one video embedding. The
text tower is a `TunedModel` over the text backbone; its head reads the pooled token (EOT for CLIP,
CLS or the mean for BERT-style towers, `auto_pool`). Both towers end in CLIP's
LayerNorm + projection (`ProjectionHead`), copied from a CLIP tower's own weights where present.

Loss (ArrowLuo/CLIP4Clip `modeling.py`): symmetric cross-entropy over the in-batch
`texts x videos` logits `exp(s) cos(t, v)` with one learnable logit scale. For MDPD the side path
carries that task loss, and the backbone path (what is deployed) learns from it through
`objective`:
- `cross_relational` (default; what ITR measured to work, tasks/itr.md): the task loss on the
  backbone path's embeddings too, plus the KL from the side path's text-to-video similarity
  distribution to the backbone path's (`heads.retrieval.relational_kl_2d`, weight
  `cross_relational`, temperature `rel_temperature`). The teacher is the DualPath output's
  `y_teacher` (an EMA teacher) when it has one, else the side path, detached;
- `paper`: only the per-tower distillation inside DualPath (`method.distill.logits`, MSE per frame
  and per caption in the paper) carries the signal; no backbone task loss.
The similarity head and the logit scale are shared by both paths (they are task parameters, not
side modules): the deployed video encoder = faded image backbone + its head per frame + the head.
Several processes: text and video embeddings are gathered (`mdpd_vl.dist.gather_batch`) before every
in-batch term, so the softmaxes range over the global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.dist import gather_batch, mean_weight
from mdpd_vl.errors import UserError
from mdpd_vl.heads.clip4clip import (
    CLIP_LOGIT_SCALE_INIT,
    CLIP_LOGIT_SCALE_MAX,
    POOLS,
    SIM_HEADS,
    LogitScale,
    ProjectionHead,
    SeqTransf,
    VideoEncoder,
    build_sim_head,
    clip_projection,
    frames_of,
    init_projection_from,
    init_seq_transf_from_text,
    scatter_frames,
    similarity_logits,
    symmetric_cross_entropy,
    video_shape,
)
from mdpd_vl.heads.retrieval import relational_kl_2d
from mdpd_vl.tuning.config import MethodConfig
from mdpd_vl.tuning.model import HeadTuned, MdpdTuned, TunedModel

OBJECTIVES = ("cross_relational", "paper")


@dataclass
class VTRConfig:
    """The CLIP4Clip head, its loss, and how MDPD's backbone path learns it."""

    sim: str = field(default="meanP", metadata={"help": "similarity head: meanP | seqTransf"})
    embed_dim: int | None = field(
        default=None, metadata={"help": "joint embedding width; null = the CLIP projection width, else 256"}
    )
    image_pool: str = field(default="auto", metadata={"help": "frame token the head reads: auto | cls | mean"})
    text_pool: str = field(default="auto", metadata={"help": "text token the head reads: auto | last (EOT) | cls | mean"})
    init_from_clip: bool = field(
        default=True, metadata={"help": "copy CLIP's projections and text blocks where shapes allow"}
    )
    seq_layers: int = field(default=4, metadata={"help": "seqTransf blocks (CLIP4Clip cross_num_hidden_layers)"})
    seq_heads: int | None = field(default=None, metadata={"help": "seqTransf heads; null = the text tower's or width // 64"})
    max_positions: int = field(default=77, metadata={"help": "seqTransf frame positions (CLIP4Clip: 77)"})
    logit_scale_init: float = field(
        default=CLIP_LOGIT_SCALE_INIT, metadata={"help": "initial log logit scale (CLIP: log(1/0.07); pretrained OpenAI CLIP: log(100))"}
    )
    logit_scale_max: float = field(default=CLIP_LOGIT_SCALE_MAX, metadata={"help": "clamp of the log logit scale"})
    objective: str = field(
        default="cross_relational",
        metadata={"help": "mdpd: cross_relational (backbone task loss + cross-modal relational KL) | paper"},
    )
    cross_relational: float = field(default=1.0, metadata={"help": "mdpd: weight of the cross-modal relational KL"})
    rel_temperature: float = field(default=0.05, metadata={"help": "temperature of the relational KL"})
    mask_same_video: bool = field(
        default=False, metadata={"help": "drop other captions of the same video from the negatives (not in CLIP4Clip)"}
    )

    def __post_init__(self) -> None:
        SIM_HEADS.get(self.sim, field="sim")
        if self.image_pool not in ("auto", "cls", "mean"):
            raise UserError(f"unknown pool {self.image_pool!r}; valid: auto, cls, mean", field="image_pool")
        if self.text_pool not in ("auto", *POOLS):
            raise UserError(f"unknown pool {self.text_pool!r}; valid: auto, {', '.join(POOLS)}", field="text_pool")
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}",
                            field="objective")
        for name in ("seq_layers", "max_positions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError("must be a positive integer", field=name)
        for name in ("embed_dim", "seq_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise UserError("must be a positive integer or null", field=name)
        if self.cross_relational < 0:
            raise UserError("must be >= 0", field="cross_relational")
        if not self.rel_temperature > 0:
            raise UserError("must be > 0", field="rel_temperature")
        if self.logit_scale_init > self.logit_scale_max:
            raise UserError(f"exceeds logit_scale_max {self.logit_scale_max}", field="logit_scale_init")


@dataclass
class TowerOut:
    """One tower's outputs on a batch: the trained path, MDPD's backbone path and teacher, losses."""

    y: Tensor
    y_backbone: Tensor | None
    y_teacher: Tensor | None
    losses: dict[str, Tensor]


class VideoTextRetrieval(nn.Module):
    """A per-frame video tower and a text tower, a similarity head, a logit scale."""

    def __init__(self, video: TunedModel, text: TunedModel, sim: nn.Module, cfg: VTRConfig,
                 init_report: Mapping[str, Any] | None = None):
        super().__init__()
        self.video, self.text, self.sim, self.cfg = video, text, sim, cfg
        self.logit_scale = LogitScale(cfg.logit_scale_init, cfg.logit_scale_max)
        self.init_report = dict(init_report or {})

    @property
    def is_mdpd(self) -> bool:
        return isinstance(self.video, MdpdTuned)

    # -- forward ------------------------------------------------------------------------------
    @staticmethod
    def _tower(tuned: TunedModel, x: Any) -> TowerOut:
        if isinstance(tuned, MdpdTuned):
            out = tuned.core(x)  # the task loss couples the towers: computed here, not in a tower
            teacher = getattr(out, "y_teacher", None)
            return TowerOut(out.y_side, out.y_backbone, teacher, dict(out.losses))
        y, losses = tuned.train_forward(x)
        return TowerOut(y, None, None, dict(losses))

    def video_tower(self, video: Any, frame_mask: Tensor | None) -> TowerOut:
        """The video tower on the valid frames, outputs back in `B x T x E` (zeros at padding).
        `video` is a `B x T x 3 x H x W` tensor or the valid frames' cached features (`Precomputed`)."""
        out = self._tower(self.video, frames_of(video, frame_mask))
        shape = video_shape(video, frame_mask)

        def put(y: Tensor | None) -> Tensor | None:
            return None if y is None else scatter_frames(y, frame_mask, shape)

        # per-frame means: weighted so that the processes' average is the global batch's mean over frames
        w = mean_weight(shape[0] * shape[1] if frame_mask is None else int(frame_mask.sum()))
        return TowerOut(put(out.y), put(out.y_backbone), put(out.y_teacher), {k: v * w for k, v in out.losses.items()})

    def losses(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Named, weighted losses of one batch (`video`, `frame_mask`, `text`, optional
        `video_index`); their sum is the objective."""
        self.logit_scale.clamp_()  # CLIP4Clip clamps after every step: the same value reaches this forward
        mask = batch.get("frame_mask")
        vt = self.video_tower(batch["video"], mask)
        tt = self._tower(self.text, batch["text"])
        vid = batch.get("video_index")
        vid = torch.as_tensor(vid, device=vt.y.device) if vid is not None else None
        t_side, v_side, vid = gather_batch(tt.y, self.sim(vt.y, mask), vid)  # the global batch
        ignore = None
        if self.cfg.mask_same_video and vid is not None:
            ignore = vid.view(-1, 1) == vid.view(1, -1)
        scale = self.logit_scale()
        out = {"task": symmetric_cross_entropy(similarity_logits(t_side, v_side, scale), ignore)}
        out.update({f"video_{k}": v for k, v in vt.losses.items()})
        out.update({f"text_{k}": v for k, v in tt.losses.items()})
        if vt.y_backbone is None or tt.y_backbone is None or self.cfg.objective == "paper":
            return out
        t_bb, v_bb = gather_batch(tt.y_backbone, self.sim(vt.y_backbone, mask))
        out["task_backbone"] = symmetric_cross_entropy(similarity_logits(t_bb, v_bb, scale), ignore)
        if self.cfg.cross_relational > 0:
            if vt.y_teacher is not None and tt.y_teacher is not None:
                with torch.no_grad():
                    teacher = similarity_logits(*gather_batch(tt.y_teacher, self.sim(vt.y_teacher, mask)))
            else:
                teacher = similarity_logits(t_side, v_side)
            student = similarity_logits(t_bb, v_bb)
            kl = relational_kl_2d(teacher, student, self.cfg.rel_temperature)  # detaches the teacher
            out["cross_relational"] = self.cfg.cross_relational * kl
        return out

    # -- deployment ---------------------------------------------------------------------------
    def deployed(self, side_kept: bool = False) -> tuple[VideoEncoder, nn.Module]:
        """(video encoder, text encoder) as served: the faded backbones for MDPD unless `side_kept`.
        The video encoder returns L2-normalised `B x E`; the text encoder the raw `B x E` (normalise
        before the dot product, `similarity_logits` does)."""
        if side_kept:
            if not self.is_mdpd:
                raise ValueError("side_kept applies to mdpd only")
            return VideoEncoder(self.video.core.side_kept(), self.sim), self.text.core.side_kept()
        return VideoEncoder(self.video.deployed(), self.sim), self.text.deployed()

    def bare(self) -> tuple[nn.Module, nn.Module]:
        """The untuned backbones alone (per-layer features, per frame for video): the QPS reference."""
        return _BareVideo(self.video.backbone), self.text.backbone  # forward = per-layer features

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The towers' named groups prefixed `video.` / `text.`, then `sim` and `logit_scale`."""
        out: dict[str, list[nn.Parameter]] = {}
        for tower, tuned in (("video", self.video), ("text", self.text)):
            for name, params in tuned.param_groups().items():
                out[f"{tower}.{name}"] = params
        out["sim"] = list(self.sim.parameters())
        out["logit_scale"] = list(self.logit_scale.parameters())
        return out

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for group in self.param_groups().values() for p in group)

    def inference_params(self, side_kept: bool = False) -> int:
        """Scalars in the deployed video + text encoders (each tensor once)."""
        seen: dict[int, int] = {}
        for module in self.deployed(side_kept):
            seen.update({id(p): p.numel() for p in module.parameters()})
        return sum(seen.values())

    def example_batch(self, batch_size: int = 2, num_frames: int = 4) -> dict[str, Any]:
        """A valid training / timing batch from the backbones' own example inputs (random pixels and
        ids, every frame valid): `video` `B x T x 3 x H x W`, `frame_mask`, `text`, `video_index`."""
        frames = self.video.backbone.example_input(batch_size * num_frames)
        video = frames.reshape(batch_size, num_frames, *frames.shape[1:])
        return {"video": video, "frame_mask": torch.ones(batch_size, num_frames, dtype=torch.bool),
                "text": self.text.backbone.example_input(batch_size), "video_index": torch.arange(batch_size)}


class _BareVideo(nn.Module):
    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, video: Tensor | dict[str, Tensor], frame_mask: Tensor | None = None) -> list[Tensor]:
        if isinstance(video, dict):
            video, frame_mask = video["video"], video.get("frame_mask")
        return self.backbone.features(frames_of(video, frame_mask))




# ----------------------------------------------------------------------------- building
def auto_pool(backbone: Backbone) -> str:
    """The token a CLIP-style head reads: image towers with a class token `cls`, else `mean`; CLIP
    text towers (open_clip, transformers CLIP) `last` (= EOT: valid tokens are a prefix); other text
    towers their own sentence pooling (`mean` for MiniLM-style, else `cls`)."""
    if backbone.modality != "text":
        return "cls" if backbone.layer_specs[-1].prefix > 0 else "mean"
    if getattr(backbone, "pooling", None) == "mean":
        return "mean"
    config = getattr(getattr(backbone, "model", None), "config", None)
    if hasattr(backbone, "context_length") or "clip" in str(getattr(config, "model_type", "")):
        return "last"
    return "cls"


def backbone_head(tuned: TunedModel) -> nn.Module | None:
    """The head on the backbone path (what deploys on top of the backbone), None for side-kept methods."""
    if isinstance(tuned, MdpdTuned):
        return tuned.core.head_backbone
    if isinstance(tuned, HeadTuned):
        return tuned.model.head
    return None


def _embed_dim(cfg: VTRConfig, image_bb: Backbone, text_bb: Backbone) -> int:
    if cfg.embed_dim is not None:
        return cfg.embed_dim
    widths = {p[1].shape[1] for p in (clip_projection(getattr(b, "model", b)) for b in (image_bb, text_bb)) if p}
    return widths.pop() if len(widths) == 1 else 256


def _sim_head(cfg: VTRConfig, width: int, text_bb: Backbone) -> tuple[nn.Module, dict[str, int]]:
    """The similarity head; seqTransf takes the text tower's head count and first blocks when the
    text width equals the embedding width (CLIP4Clip: transformer_width, 4 text resblocks)."""
    if cfg.sim != "seqTransf":
        return build_sim_head(cfg.sim, width), {}
    blocks = list(text_bb.blocks) if cfg.init_from_clip and text_bb.widths[-1] == width else []
    src_heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None
    head = build_sim_head("seqTransf", width, layers=cfg.seq_layers, heads=cfg.seq_heads or src_heads,
                          max_positions=cfg.max_positions)
    assert isinstance(head, SeqTransf)
    if not blocks:
        return head, {"layers": 0, "positions": 0}
    positional = getattr(getattr(text_bb, "model", None), "positional_embedding", None)
    return head, init_seq_transf_from_text(head, blocks, positional if isinstance(positional, Tensor) else None)


def build_vtr_model(image_bb: Backbone, text_bb: Backbone, method: MethodConfig,
                    cfg: VTRConfig | None = None) -> VideoTextRetrieval:
    """Backbones -> similarity head (seqTransf initialised from the still untouched text tower) ->
    CLIP projection heads -> the tuning method on each tower -> CLIP's projections copied in."""
    from mdpd_vl.tuning import apply_method

    cfg = cfg or VTRConfig()
    width = _embed_dim(cfg, image_bb, text_bb)
    sim, seq_report = _sim_head(cfg, width, text_bb)
    pools = {"video": cfg.image_pool if cfg.image_pool != "auto" else auto_pool(image_bb),
             "text": cfg.text_pool if cfg.text_pool != "auto" else auto_pool(text_bb)}
    towers = ("video", "text")  # the names a per-tower `distill.head_layers` may use
    video = apply_method(image_bb, lambda w: ProjectionHead(w, width, pools["video"]), method.for_tower("video", towers))
    text = apply_method(text_bb, lambda w: ProjectionHead(w, width, pools["text"]), method.for_tower("text", towers))
    report: dict[str, Any] = {"embed_dim": width, "pools": pools, "seq_transf": seq_report, "projection": {}}
    for name, tuned in (("video", video), ("text", text)):
        head = backbone_head(tuned)
        copied = cfg.init_from_clip and isinstance(head, ProjectionHead) and \
            init_projection_from(head, getattr(tuned.backbone, "model", tuned.backbone))
        report["projection"][name] = bool(copied)
    return VideoTextRetrieval(video, text, sim, cfg, report)
