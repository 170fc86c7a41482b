"""VQA / GQA with CLIP-ViL on any tuning method: the task model the VQA recipe trains and deploys.

The backbone is `CrossModalBackbone` (image backbone -> connector -> BERT-class encoder over
[question; image]); every method of `mdpd_vl.tuning.apply_method` adapts it unchanged and the head
is `AnswerHead` (first token -> LXMERT's answer MLP). Losses (Paranioar/UniPT `CLIP-ViL/src/tasks/
vqa.py`, `gqa.py`): VQAv2 BCE against the soft scores, summed over answers (LXMERT's); GQA
cross-entropy on the single answer (CLIP-ViL's `--mce_loss`; `gqa_loss: bce` is its default).

MDPD (ours): the task loss on the side path, the DualPath feature losses, and for the backbone path
the side's answer distribution taught by KL with temperature plus the task loss on the backbone
path's own answers (`logits: kl`, `backbone_task: true`, the lesson of the ITR task); `logits: mse`
is the paper's eq. 3 (sum over answers, mean over the batch, weight 1e-4). The teacher is the
DualPath output's `y_teacher` when it has one (EMA teacher), else the detached side answers.
`deployed()` is the faded model (backbone + answer head, no side module); `deployed(side_kept=True)`
the side path.

The connector (see `mdpd_vl/backbones/crossmodal.py` for the decision): `ConnectorAlignment` trains
it once through the frozen encoder before the methods run, standing in for the pre-trained CLIP-ViL
checkpoint; in the methods it stays frozen, except that its projection trains (`connector` group)
where the method already back-propagates into the first encoder block, as CLIP-ViL's adapter and
LoRA runs train `visn_fc`. Training it in every method instead would put every encoder activation
in the graph of the methods that exist to avoid it (MDPD `head`; `test_vqa_model.py` measures that
this graph alone outweighs MDPD's whole head-only step; activation checkpointing shrinks it at the
price of a second encoder pass per step), and it could not work for the side-kept baselines at
all, whose side networks read detached features.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.crossmodal import CrossModalBackbone
from mdpd_vl.deploy.vqa import VisualQuestionAnswerer, default_preprocess
from mdpd_vl.distill.losses import logits_mse
from mdpd_vl.errors import UserError
from mdpd_vl.heads.crossmodal import POOLINGS, AnswerHead, answer_kl, gqa_bce, gqa_ce, vqa_bce
from mdpd_vl.tuning import MdpdTuned, MethodConfig, TunedModel, apply_method

TASKS = ("vqa", "gqa")
LOGITS = ("kl", "mse", "none")


@dataclass
class VQAConfig:
    """The answer head, the task loss and how MDPD's backbone path learns the answers."""

    task: str = field(default="vqa", metadata={"help": "vqa (soft-score BCE over answers) | gqa (one answer)"})
    gqa_loss: str = field(default="ce", metadata={"help": "gqa: ce (CLIP-ViL --mce_loss) | bce (one-hot BCE)"})
    pooling: str = field(default="first", metadata={"help": "answer head input: first ([CLS], CLIP-ViL) | mean"})
    logits: str = field(
        default="kl", metadata={"help": "mdpd backbone path: kl (side's answer distribution) | mse (paper eq. 3) | none"}
    )
    temperature: float = field(default=1.0, metadata={"help": "temperature of the answer KL"})
    logits_weight: float | None = field(
        default=None, metadata={"help": "weight of the logits term; null = 1 for kl, 1e-4 (paper) for mse"}
    )
    backbone_task: bool = field(default=True, metadata={"help": "mdpd: the task loss on the backbone path too"})
    connector_in_graph: bool = field(
        default=True,
        metadata={"help": "train the connector projection in methods that back-propagate into the first "
                          "encoder block (CLIP-ViL trains visn_fc in its adapter / LoRA runs)"},
    )

    def __post_init__(self) -> None:
        for name, valid in (("task", TASKS), ("gqa_loss", ("ce", "bce")), ("pooling", POOLINGS), ("logits", LOGITS)):
            if getattr(self, name) not in valid:
                raise UserError(f"unknown {getattr(self, name)!r}; valid: {', '.join(valid)}", field=f"vqa.{name}")
        if not self.temperature > 0:
            raise UserError(f"must be > 0, got {self.temperature!r}", field="vqa.temperature")
        if self.logits_weight is not None and not self.logits_weight >= 0:
            raise UserError(f"must be >= 0 or null, got {self.logits_weight!r}", field="vqa.logits_weight")

    @property
    def weight(self) -> float:
        """The logits term's weight (see `logits_weight`)."""
        if self.logits_weight is not None:
            return float(self.logits_weight)
        return 1e-4 if self.logits == "mse" else 1.0


def task_loss(cfg: VQAConfig, logits: Tensor, batch: dict[str, Any]) -> Tensor:
    """VQA: `vqa_bce` against `batch["target"]`; GQA: `gqa_ce` / `gqa_bce` on `batch["label"]`."""
    if cfg.task == "vqa":
        return vqa_bce(logits, batch["target"].to(logits.device))
    label = torch.as_tensor(batch["label"], device=logits.device)
    return gqa_ce(logits, label) if cfg.gqa_loss == "ce" else gqa_bce(logits, label)


def batch_inputs(batch: dict[str, Any]) -> Any:
    """The backbone input of a collated batch: `inputs` when the collate built it (image grids or
    cached encoder features), else `image` + `text` (the question tokens)."""
    if "inputs" in batch:
        return batch["inputs"]
    return CrossModalBackbone.inputs(batch["image"], batch["text"])


def answer_head_factory(num_answers: int, pooling: str = "first") -> Any:
    """`head_factory(width)` for `apply_method`: a fresh `AnswerHead` on a layer of that width."""
    return lambda width: AnswerHead(width, num_answers, pooling)


class VQAModel(nn.Module):
    """A tuned cross-modal backbone + answer heads; `losses(batch)` trains it, `deployed()` serves it."""

    def __init__(self, tuned: TunedModel, answers: Sequence[str], cfg: VQAConfig):
        super().__init__()
        if not isinstance(tuned.backbone, CrossModalBackbone):
            raise TypeError(f"VQAModel needs a CrossModalBackbone, got {type(tuned.backbone).__name__}")
        self.tuned, self.answers, self.cfg = tuned, list(answers), cfg
        if self.is_mdpd:
            dcfg = tuned.core.cfg  # type: ignore[attr-defined]
            if dcfg.task_on_backbone or (dcfg.logits != "none" and dcfg.logits_weight != 0):
                raise ValueError("build MDPD for VQA with build_vqa_model: its logits and backbone task terms "
                                 "are computed here (vqa.logits, vqa.backbone_task), not inside DualPath")
        self.connector_params = self._enable_connector()

    @property
    def backbone(self) -> CrossModalBackbone:
        return self.tuned.backbone  # type: ignore[return-value]

    @property
    def is_mdpd(self) -> bool:
        return isinstance(self.tuned, MdpdTuned)

    def _enable_connector(self) -> list[nn.Parameter]:
        """The connector projection trains when the method's graph already reaches the first block."""
        conn = self.backbone.connector.projection_parameters()
        trained = {id(p) for group in self.tuned.param_groups().values() for p in group}
        if not self.cfg.connector_in_graph or any(id(p) in trained for p in conn):
            return []  # off, or already trained by the method itself (full)
        first_block = {id(p) for p in self.backbone.blocks[0].parameters()}
        if not trained & first_block:
            return []
        for p in conn:
            p.requires_grad_(True)
        return conn

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The method's named groups, plus `connector` when it trains."""
        return {**self.tuned.param_groups(), "connector": list(self.connector_params)}

    def train(self, mode: bool = True) -> VQAModel:
        super().train(mode)
        self.tuned.train(mode)  # each method keeps its frozen backbone in its own mode
        return self

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named, weighted losses of one collated batch; their sum is the objective."""
        x = batch_inputs(batch)
        if not self.is_mdpd:
            _, losses = self.tuned.train_forward(x, lambda out: task_loss(self.cfg, out, batch))
            return losses
        out = self.tuned.core(x)  # type: ignore[attr-defined]
        losses = {k: v for k, v in out.losses.items() if k != "logits"}  # DualPath's own term has weight 0
        losses["task"] = task_loss(self.cfg, out.y_side, batch)
        if self.cfg.backbone_task:
            losses["task_backbone"] = task_loss(self.cfg, out.y_backbone, batch)
        if self.cfg.logits != "none":
            teacher = getattr(out, "y_teacher", None)
            if teacher is None:
                if self.tuned.core.ema is not None:  # type: ignore[attr-defined]
                    raise RuntimeError("this DualPath has an EMA teacher but returns no y_teacher")
                teacher = out.y_side
            raw = (answer_kl(teacher, out.y_backbone, self.cfg.temperature) if self.cfg.logits == "kl"
                   else logits_mse(teacher, out.y_backbone))
            losses["logits"] = self.cfg.weight * raw
        return losses

    def deployed(self, side_kept: bool = False) -> nn.Module:
        """The module that answers at inference: faded for MDPD unless `side_kept`."""
        if side_kept:
            if not self.is_mdpd:
                raise ValueError("side_kept applies to mdpd only")
            return self.tuned.core.side_kept()  # type: ignore[attr-defined]
        return self.tuned.deployed()

    def answerer(self, side_kept: bool = False, preprocess: dict[str, Any] | None = None) -> VisualQuestionAnswerer:
        """`answer(images, questions) -> list[str]` over the deployed (or side-kept) module, with the
        evaluation's `preprocess` (default: the backbone's own transform and question length)."""
        return VisualQuestionAnswerer(self.deployed(side_kept), preprocess or default_preprocess(self.backbone),
                                      self.answers, self.backbone)


def build_vqa_model(backbone: CrossModalBackbone, method: MethodConfig, answers: Sequence[str],
                    cfg: VQAConfig | None = None) -> VQAModel:
    """Apply `method` to the cross-modal backbone with answer heads; MDPD's logits and backbone task
    terms move out of DualPath into `VQAModel.losses` (DualPath keeps its feature losses; its own
    logits term stays at weight 0, so that whatever teacher it computes is still produced)."""
    cfg = cfg or VQAConfig()
    if not answers:
        raise UserError("the answer vocabulary is empty", field="vocab")
    method = copy.deepcopy(method)
    if method.name == "mdpd":
        method.distill.logits, method.distill.logits_weight = "mse", 0.0
        method.distill.task_on_backbone = False
    tuned = apply_method(backbone, answer_head_factory(len(answers), cfg.pooling), method)
    return VQAModel(tuned, answers, cfg)


class ConnectorAlignment(nn.Module):
    """The shared stage that trains the connector (+ a throwaway answer head) through the frozen
    encoder: our stand-in for the pre-trained CLIP-ViL checkpoint. Everything else is frozen and in
    eval mode; the encoder keeps its graph so the answers' gradient reaches the connector."""

    def __init__(self, backbone: CrossModalBackbone, num_answers: int, cfg: VQAConfig | None = None):
        super().__init__()
        self.cfg = cfg or VQAConfig()
        self.backbone = backbone
        self.head = AnswerHead(backbone.widths[-1], num_answers, self.cfg.pooling)
        backbone.requires_grad_(False)
        backbone.connector.requires_grad_(True)
        self.train(self.training)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """`connector` (position tables, projection, LayerNorm) and `align_head`."""
        return {"connector": list(self.backbone.connector.parameters()), "align_head": list(self.head.parameters())}

    def train(self, mode: bool = True) -> ConnectorAlignment:
        super().train(mode)
        self.backbone.eval()
        self.backbone.connector.train(mode)
        return self

    def forward(self, x: dict[str, Tensor]) -> Tensor:
        return self.head(self.backbone.features(x)[-1], self.backbone.padding_mask(x))

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The task loss of one collated batch."""
        return {"task": task_loss(self.cfg, self(batch_inputs(batch)), batch)}
