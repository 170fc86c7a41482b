"""Referring-expression grounding (MDETR) on any tuning method, with the side network in one of two places.

- Placement A, `backbones` (the embedded default): each backbone (image CNN, text encoder) is tuned by the method
  (`apply_method`, as the ITR towers are); its task head passes its tokens through (`TokenPassthrough`), and the MDETR transformer
  (`heads.grounding.GroundingTransformer`) reads both towers' tokens and is trained as the head (nothing
  pre-trains it offline). MDPD runs one DualPath per tower and two transformers: the side path's (`head_side`,
  the paper's W_S) and the backbone path's (`head`, W_B, the one that is deployed).
- Placement B, `transformer` (UniPT's): a pre-trained MDETR (`backbones.mdetr.MdetrBackbone`: its encoder and
  decoder layers are the layers) is tuned by the method; the box / score head (`BoxScoreHead`, initialised from the
  pre-trained one) reads the decoder output, or the side network's output for side-kept methods and MDPD's side path.

MDPD's grounding objective (both placements): the task loss (MDETR set loss) on the side path; the task loss on the
backbone path too (`task_on_backbone`, default); and logits distillation on the matched queries: the side path's
prediction for its matched query teaches the backbone path's matched query (`logits: match`, the task's own L1 +
GIoU + soft cross-entropy; `logits: mse`, the paper's eq. 3). The teacher is the DualPath output's `y_teacher`
when the DualPath has an EMA teacher (`distill.ema_teacher`), else the live side path's prediction, detached. DualPath's own logits / task terms are switched
off (they would compare token maps); its feature losses (shallow imitation, deep masked generation) stay.
`deployed()` is the faded model (backbones + W_B transformer / head): no side module exists in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.data.collate import Collator, Tokenize
from mdpd_vl.deploy.grounding import Grounder, PackedGrounder, TowerGrounder, image_grid
from mdpd_vl.errors import UserError
from mdpd_vl.heads.grounding import (
    BoxScoreHead,
    GroundingConfig,
    GroundingOutput,
    GroundingTransformer,
    TokenPassthrough,
    positive_map,
)
from mdpd_vl.heads.grounding_loss import (
    Targets,
    hungarian_match,
    matched_distillation,
    matched_queries,
    set_losses,
)
from mdpd_vl.tuning import MdpdTuned, MethodConfig, SideTuned, TunedModel, apply_method, count_params

PLACEMENTS = ("backbones", "transformer")
LOGITS = ("match", "mse", "none")


@dataclass
class VGConfig:
    """Where the side network sits and how MDPD's side path teaches the backbone path."""

    placement: str = field(default="backbones", metadata={
        "help": "backbones: side networks over the image/text backbones, MDETR transformer trained as the head; "
                "transformer: over the encoder/decoder layers of a pre-trained MDETR (UniPT's)"})
    logits: str = field(default="match", metadata={
        "help": "matched-query distillation: match (L1 + GIoU + soft CE to the side's prediction) | mse (paper) | none"})
    logits_weight: float = field(default=1.0, metadata={"help": "weight of the matched-query distillation"})
    task_on_backbone: bool = field(default=True, metadata={"help": "mdpd: the task loss on the backbone path too"})

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise UserError(f"unknown placement {self.placement!r}; valid: {', '.join(PLACEMENTS)}",
                            field="vg.placement")
        if self.logits not in LOGITS:
            raise UserError(f"unknown objective {self.logits!r}; valid: {', '.join(LOGITS)}", field="vg.logits")
        if not self.logits_weight >= 0:
            raise UserError(f"must be >= 0, got {self.logits_weight!r}", field="vg.logits_weight")


def tower_method(cfg: MethodConfig) -> MethodConfig:
    """The method as applied to one backbone: for MDPD, DualPath's own logits and task terms off (the grounding
    losses couple the paths through the transformer and are computed here)."""
    if cfg.name != "mdpd":
        return cfg
    if cfg.distill.schedule == "alternate":
        raise UserError("grounding trains both paths every step; use schedule: joint", field="method.distill.schedule")
    return replace(cfg, distill=replace(cfg.distill, logits="none", task_on_backbone=False))


# -- training models --------------------------------------------------------------------------------
class GroundingModel(nn.Module):
    """Shared by both placements: `losses(batch)`, `deployed(side_kept)`, `param_groups()`, counts."""

    cfg: GroundingConfig
    vg: VGConfig

    @property
    def is_mdpd(self) -> bool:
        raise NotImplementedError

    @property
    def method(self) -> str:
        raise NotImplementedError

    def deployed(self, side_kept: bool = False) -> Grounder:
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    @property
    def trainable_params(self) -> int:
        return count_params(p for group in self.param_groups().values() for p in group)

    @property
    def inference_params(self) -> int:
        return count_params(self.deployed().parameters())

    def targets(self, batch: dict[str, Any]) -> Targets:
        """The batch's boxes and MDETR positive maps (one span: the expression's non-special tokens)."""
        expr = batch.get("expression_mask")
        if expr is None:
            expr = batch["text"]["attention_mask"].bool()
        return Targets.single(batch["box"], positive_map(expr, self.cfg.num_tokens), expr)

    def _task(self, out: GroundingOutput, targets: Targets) -> tuple[Tensor, Tensor]:
        terms, indices = set_losses(out, targets, self.cfg)
        return torch.stack(list(terms.values())).sum(), matched_queries(indices)

    def _mdpd_losses(self, side: GroundingOutput, back: GroundingOutput, teacher: GroundingOutput | None,
                     targets: Targets) -> dict[str, Tensor]:
        """Task on the side path, task on the backbone path, matched-query distillation side -> backbone."""
        out: dict[str, Tensor] = {}
        out["task"], q_side = self._task(side, targets)
        if self.vg.task_on_backbone:
            out["task_backbone"], q_back = self._task(back, targets)
        else:
            q_back = self._match(back, targets)
        if self.vg.logits != "none":
            q_teacher = q_side if teacher is None else self._match(teacher, targets)
            raw = matched_distillation(side if teacher is None else teacher, q_teacher, back, q_back, self.cfg,
                                       self.vg.logits)
            out["logits"] = self.vg.logits_weight * raw
        return out

    def _match(self, out: GroundingOutput, targets: Targets) -> Tensor:
        c = self.cfg
        return matched_queries(hungarian_match(out, targets, c.cost_class, c.cost_bbox, c.cost_giou))

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named, weighted losses of one batch; their sum is the objective."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the deployed model as an MDETR checkpoint (`backbones.mdetr.load_mdetr` reads it back)."""
        raise NotImplementedError

    def bare(self) -> Grounder:
        """The untuned architecture (backbones + an MDETR transformer / box head of the backbone widths, eval
        mode): what the deployed model's latency is measured against."""
        raise NotImplementedError

    @property
    def tuned_models(self) -> list[TunedModel]:
        raise NotImplementedError

    @property
    def savable(self) -> bool:
        """`save_pretrained` applies: the deployed model is a plain MDETR (no side network, no unmerged adapter)."""
        return not any(isinstance(t, SideTuned) or t.method in ("lora", "adapter") for t in self.tuned_models)


def ema_teacher(tuned: MdpdTuned, out: Any) -> Tensor | None:
    """The DualPath output's `y_teacher` when it comes from an EMA teacher, else None: without one it is the
    live side output, detached, which the side path's own prediction already gives (no second transformer
    run, no second matching)."""
    if getattr(tuned.core, "ema", None) is None:
        return None
    return getattr(out, "y_teacher", None)


def _prefixed(losses: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v for k, v in losses.items()}


def _side_width(tuned: TunedModel) -> int | None:
    if isinstance(tuned, MdpdTuned):
        return tuned.core.side.out_width
    if isinstance(tuned, SideTuned):
        return tuned.model.side.out_width
    return None


def _check_plain(tuned: TunedModel, what: str) -> None:
    if isinstance(tuned, SideTuned) or tuned.method in ("lora", "adapter"):
        raise UserError(f"{what}: a {tuned.method} model is not a plain MDETR (merge LoRA / use a faded or "
                        "backbone-tuned model)", field="method.name")


class TowerGrounding(GroundingModel):
    """Placement A: a tuned image tower + a tuned text tower + the MDETR transformer trained as the head."""

    def __init__(self, image: TunedModel, text: TunedModel, cfg: GroundingConfig, vg: VGConfig | None = None):
        super().__init__()
        if type(image) is not type(text) or image.method != text.method:
            raise UserError("both towers must use the same method", field="method.name")
        self.image, self.text, self.cfg, self.vg = image, text, cfg, vg or VGConfig()
        side_i, side_t = _side_width(image), _side_width(text)
        if isinstance(image, SideTuned):  # side-kept: the deployed transformer reads the side tokens
            self.head = GroundingTransformer(side_i, side_t, cfg)  # type: ignore[arg-type]
        else:
            self.head = GroundingTransformer(image.backbone.widths[-1], text.backbone.widths[-1], cfg)
        self.head_side = GroundingTransformer(side_i, side_t, cfg) if self.is_mdpd else None  # type: ignore[arg-type]

    @property
    def is_mdpd(self) -> bool:
        return isinstance(self.image, MdpdTuned)

    @property
    def method(self) -> str:
        return self.image.method

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        targets = self.targets(batch)
        images, text = batch["image"], batch["text"]
        valid = self.text.backbone.padding_mask(text)
        if not self.is_mdpd:
            yi, li = self.image.train_forward(images)
            yt, lt = self.text.train_forward(text)
            task, _ = self._task(self.head(yi, image_grid(self.image.backbone, yi), yt, valid), targets)
            return {"task": task, **_prefixed(li, "image_"), **_prefixed(lt, "text_")}
        assert isinstance(self.image, MdpdTuned) and isinstance(self.text, MdpdTuned) and self.head_side is not None
        oi, ot = self.image.core(images), self.text.core(text)
        grid = image_grid(self.image.backbone, oi.y_backbone)
        side = self.head_side(oi.y_side, image_grid(self.image.backbone, oi.y_side), ot.y_side, valid)
        back = self.head(oi.y_backbone, grid, ot.y_backbone, valid)
        teacher = None
        ti, tt = ema_teacher(self.image, oi), ema_teacher(self.text, ot)
        if ti is not None and tt is not None:
            with torch.no_grad():
                teacher = self.head_side(ti, image_grid(self.image.backbone, ti), tt, valid).detach()
        return {**self._mdpd_losses(side, back, teacher, targets), **_prefixed(oi.losses, "image_"),
                **_prefixed(ot.losses, "text_")}

    def deployed(self, side_kept: bool = False) -> TowerGrounder:
        """Faded (MDPD) or as the method serves it; `side_kept` (MDPD): backbones + side networks + W_S."""
        backbones = (self.image.backbone, self.text.backbone)
        if side_kept:
            if not isinstance(self.image, MdpdTuned) or not isinstance(self.text, MdpdTuned):
                raise ValueError("side_kept applies to mdpd only")
            assert self.head_side is not None
            return TowerGrounder(self.image.core.side_kept(), self.text.core.side_kept(), backbones, self.head_side)
        return TowerGrounder(self.image.deployed(), self.text.deployed(), backbones, self.head)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        out = {f"image.{k}": v for k, v in self.image.param_groups().items()}
        out.update({f"text.{k}": v for k, v in self.text.param_groups().items()})
        out["head"] = list(self.head.parameters())
        if self.head_side is not None:
            out["side_head"] = list(self.head_side.parameters())
        return out

    @property
    def tuned_models(self) -> list[TunedModel]:
        return [self.image, self.text]

    def bare(self) -> TowerGrounder:
        from mdpd_vl.export import FadedModel

        image, text = self.image.backbone, self.text.backbone
        transformer = GroundingTransformer(image.widths[-1], text.widths[-1], self.cfg).eval()
        return TowerGrounder(FadedModel(image, TokenPassthrough()), FadedModel(text, TokenPassthrough()),
                             (image, text), transformer)

    def save_pretrained(self, folder: str | Path) -> Path:
        from mdpd_vl.backbones.mdetr import save_mdetr

        _check_plain(self.image, "save_pretrained")
        return save_mdetr(folder, self.image.backbone, self.text.backbone, self.head.core, self.head.head,
                          extra={"method": self.method, "placement": "backbones"})


class TransformerGrounding(GroundingModel):
    """Placement B: the method applied to a pre-trained MDETR's transformer layers (`MdetrBackbone`)."""

    def __init__(self, tuned: TunedModel, cfg: GroundingConfig, vg: VGConfig | None = None):
        super().__init__()
        self.tuned, self.cfg, self.vg = tuned, cfg, vg or VGConfig(placement="transformer")

    @property
    def is_mdpd(self) -> bool:
        return isinstance(self.tuned, MdpdTuned)

    @property
    def method(self) -> str:
        return self.tuned.method

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        targets = self.targets(batch)
        x = {"images": batch["image"], "text": batch["text"]}
        if not isinstance(self.tuned, MdpdTuned):
            y, extra = self.tuned.train_forward(x)
            task, _ = self._task(BoxScoreHead.unpack(y), targets)
            return {"task": task, **extra}
        out = self.tuned.core(x)
        teacher = ema_teacher(self.tuned, out)
        teacher = None if teacher is None else BoxScoreHead.unpack(teacher.detach())
        side, back = BoxScoreHead.unpack(out.y_side), BoxScoreHead.unpack(out.y_backbone)
        return {**self._mdpd_losses(side, back, teacher, targets), **out.losses}

    def deployed(self, side_kept: bool = False) -> PackedGrounder:
        if side_kept:
            if not isinstance(self.tuned, MdpdTuned):
                raise ValueError("side_kept applies to mdpd only")
            return PackedGrounder(self.tuned.core.side_kept())
        return PackedGrounder(self.tuned.deployed())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.tuned.param_groups()

    @property
    def tuned_models(self) -> list[TunedModel]:
        return [self.tuned]

    def bare(self) -> PackedGrounder:
        from mdpd_vl.export import FadedModel

        backbone = self.tuned.backbone
        return PackedGrounder(FadedModel(backbone, BoxScoreHead(backbone.widths[-1], self.cfg.num_tokens)).eval())

    def save_pretrained(self, folder: str | Path) -> Path:
        from mdpd_vl.backbones.mdetr import MdetrBackbone, save_mdetr

        _check_plain(self.tuned, "save_pretrained")
        served = self.tuned.deployed()
        backbone, head = served.backbone, served.head  # FadedModel: the MDETR backbone and W_B
        assert isinstance(backbone, MdetrBackbone) and isinstance(head, BoxScoreHead)
        return save_mdetr(folder, backbone.image, backbone.text, backbone.core, head,
                          extra={"method": self.method, "placement": "transformer"})


# -- builders -------------------------------------------------------------------------------------
def backbones_placement(image: Backbone, text: Backbone, method: MethodConfig, cfg: GroundingConfig,
                        vg: VGConfig | None = None) -> TowerGrounding:
    """Placement A: the method on each backbone, the MDETR transformer as the head."""
    m = tower_method(method)
    return TowerGrounding(apply_method(image, lambda w: TokenPassthrough(), m),
                          apply_method(text, lambda w: TokenPassthrough(), m), cfg, vg)


def transformer_placement(backbone: Any, head: BoxScoreHead, method: MethodConfig, cfg: GroundingConfig | None = None,
                          vg: VGConfig | None = None) -> TransformerGrounding:
    """Placement B: the method on a pre-trained MDETR (`MdetrBackbone` + its box / score head). Every task head of
    the pre-trained width starts from the pre-trained head; `cfg` gives the loss / matching weights (the
    architecture is the checkpoint's)."""
    arch = backbone.core.cfg
    keep = ("d_model", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "dropout", "num_queries",
            "num_tokens")
    cfg = replace(cfg or GroundingConfig(), **{k: getattr(arch, k) for k in keep}, aux_loss=False,
                  contrastive_align=False)  # one head on the final queries (see the module docstring)
    state = {k: v.detach().clone() for k, v in head.state_dict().items()}

    def head_factory(width: int) -> BoxScoreHead:
        new = BoxScoreHead(width, head.num_tokens, head.hidden if width == head.in_width else None)
        if width == head.in_width:
            new.load_state_dict(state)
        return new

    vg = vg or VGConfig(placement="transformer")
    return TransformerGrounding(apply_method(backbone, head_factory, tower_method(method)), cfg, vg)


def load_pretrained(path: str | Path, method: MethodConfig, cfg: GroundingConfig | None = None,
                    vg: VGConfig | None = None, text_backbone: str | Backbone | None = None) -> TransformerGrounding:
    """Placement B from a file: an MDETR this recipe wrote (`save_pretrained`) or an official MDETR checkpoint."""
    from mdpd_vl.backbones.mdetr import load_mdetr

    backbone, head = load_mdetr(path, text_backbone)
    return transformer_placement(backbone, head, method, cfg, vg)


# -- data -----------------------------------------------------------------------------------------
class GroundingCollator(Collator):
    """`Collator` over GroundingDataset samples (tokenising `sentence`) plus `expression_mask` (`B x L` bool):
    the valid tokens that are not special tokens ([CLS], <s>, ...), i.e. the span the positive map points at."""

    def __init__(self, tokenize: Tokenize, special_ids: Sequence[int] = ()):
        super().__init__(tokenize, text_key="sentence")
        self.special_ids = torch.tensor(sorted(set(int(i) for i in special_ids)), dtype=torch.long)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(samples)
        ids, mask = batch["text"]["input_ids"], batch["text"]["attention_mask"].bool()
        batch["expression_mask"] = mask & ~torch.isin(ids, self.special_ids)
        return batch


def special_token_ids(text_backbone: Any) -> list[int]:
    """The special token ids of a text backbone's transformers tokenizer (none when it has no such tokenizer)."""
    try:
        return list(getattr(text_backbone.tokenizer, "all_special_ids", []))
    except (AttributeError, UserError, OSError):
        return []


@torch.no_grad()
def predict(grounder: Grounder, batches: Iterable[dict[str, Any]], device: torch.device | str = "cpu"
            ) -> dict[str, Any]:
    """Top box per expression over `batches`: `pred_xyxy`, `scores`, `gt_xyxy` (N x 4 pixels), `sentences`."""
    preds, scores, gts, sentences = [], [], [], []
    for batch in batches:
        text = {k: v.to(device) for k, v in batch["text"].items()}
        boxes, score = grounder.ground(batch["image"].to(device), text, batch["orig_size"])
        preds.append(boxes.float().cpu())
        scores.append(score.float().cpu())
        gts.append(batch["bbox_xyxy"].float())
        sentences.extend(batch["sentence"])
    return {"pred_xyxy": torch.cat(preds), "scores": torch.cat(scores), "gt_xyxy": torch.cat(gts),
            "sentences": sentences}
