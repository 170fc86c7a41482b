"""Two-tower retrieval (VSE-infinity) on top of any tuning method, MDPD's dual path included.

Each tower is a `TunedModel` (image backbone + VSE head, text backbone + VSE head). The task loss
couples the towers (a caption is matched against the images of the batch), so it is computed
here rather than inside a tower. For MDPD the backbone path of both towers learns from the side
path through, per config:
- `logits`: the paper's per-tower distillation (MSE, or in-batch relational KL), inside DualPath;
- `cross_relational`: the teacher's image-to-text similarity distribution (softmax over the
  batch, temperature `rel_temperature`, detached; the teacher is `DualPathOutput.y_teacher`: the
  EMA side path when `distill.ema_teacher` is set, else the live side path) taught to the
  backbone path by KL;
- `backbone_task`: the VSE loss on the backbone path's own embeddings as well.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.errors import UserError
from mdpd_vl.heads.vse_loss import info_nce, vse_loss
from mdpd_vl.tuning.model import MdpdTuned, TunedModel


@dataclass
class RetrievalConfig:
    """The retrieval objective (VSE-infinity defaults) and how MDPD's backbone path learns it."""

    embed_dim: int = field(default=256, metadata={"help": "joint embedding width (VSE-infinity: 1024)"})
    loss: str = field(default="vse", metadata={"help": "vse (hinge triplet, hardest negative) | infonce"})
    margin: float = field(default=0.2, metadata={"help": "VSE hinge margin"})
    warmup_epochs: int = field(
        default=1, metadata={"help": "epochs summing over all negatives before hardest-negative mining"}
    )
    infonce_temperature: float = field(default=0.05, metadata={"help": "temperature of loss=infonce"})
    backbone_task: bool = field(
        default=True, metadata={"help": "mdpd: also apply the task loss to the backbone path's embeddings"}
    )
    cross_relational: float = field(
        default=1.0, metadata={"help": "mdpd: weight of the cross-modal relational KL (side -> backbone)"}
    )
    rel_temperature: float = field(default=0.05, metadata={"help": "temperature of the relational KL"})
    token_drop: float = field(default=0.2, metadata={"help": "VSE-infinity's random token drop in training"})

    def __post_init__(self) -> None:
        if self.loss not in ("vse", "infonce"):
            raise UserError(f"unknown loss {self.loss!r}; valid: vse, infonce", field="retrieval.loss")
        if self.cross_relational < 0:
            raise UserError("must be >= 0", field="retrieval.cross_relational")
        if not self.rel_temperature > 0:
            raise UserError("must be > 0", field="retrieval.rel_temperature")


def relational_kl_2d(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the image->text and text->image similarity distributions.

    Both inputs are image x text similarity matrices of L2-normalised embeddings; rows and
    columns are softmax distributions over the batch; the teacher is detached; mean over rows.
    """
    t = teacher.detach() / temperature
    s = student / temperature
    rows = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    cols = F.kl_div(F.log_softmax(s, 0).t(), F.log_softmax(t, 0).t(), log_target=True, reduction="batchmean")
    return (rows + cols) / 2


class DualTowerRetrieval(nn.Module):
    """An image tower and a text tower, trained jointly on image-caption pairs."""

    def __init__(self, image: TunedModel, text: TunedModel, cfg: RetrievalConfig):
        super().__init__()
        self.image, self.text, self.cfg = image, text, cfg
        self.epoch = 0

    @property
    def is_mdpd(self) -> bool:
        return isinstance(self.image, MdpdTuned)

    def task_loss(self, img: Tensor, txt: Tensor, image_ids: Tensor | None) -> Tensor:
        """VSE (all negatives during warm-up, hardest after) or InfoNCE."""
        if self.cfg.loss == "infonce":
            return info_nce(img, txt, self.cfg.infonce_temperature, image_ids)
        hardest = self.epoch >= self.cfg.warmup_epochs
        return vse_loss(img, txt, self.cfg.margin, max_violation=hardest, image_ids=image_ids)

    def _tower(self, tuned: TunedModel, x: Any) -> tuple[Tensor, Tensor | None, dict[str, Tensor], Tensor | None]:
        if isinstance(tuned, MdpdTuned):
            out = tuned.core(x)  # no per-tower task loss: the task loss couples the towers
            return out.y_side, out.y_backbone, out.losses, out.y_teacher
        y, losses = tuned.train_forward(x)
        return y, None, losses, None

    def losses(self, images: Any, texts: Any, image_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Named, weighted losses of one batch; their sum is the objective."""
        yi, bi, li, ti = self._tower(self.image, images)
        yt, bt, lt, tt = self._tower(self.text, texts)
        out = {"task": self.task_loss(yi, yt, image_ids)}
        out.update({f"image_{k}": v for k, v in li.items()})
        out.update({f"text_{k}": v for k, v in lt.items()})
        if bi is not None and bt is not None:
            if self.cfg.backbone_task:
                out["task_backbone"] = self.task_loss(bi, bt, image_ids)
            if self.cfg.cross_relational > 0 and ti is not None and tt is not None:
                side_sim = F.normalize(ti, dim=-1) @ F.normalize(tt, dim=-1).t()
                bb_sim = F.normalize(bi, dim=-1) @ F.normalize(bt, dim=-1).t()
                kl = relational_kl_2d(side_sim, bb_sim, self.cfg.rel_temperature)
                out["cross_relational"] = self.cfg.cross_relational * kl
        return out

    def deployed(self, side_kept: bool = False) -> tuple[nn.Module, nn.Module]:
        """(image encoder, text encoder) as served: faded for MDPD unless `side_kept`."""
        if side_kept:
            if not self.is_mdpd:
                raise ValueError("side_kept applies to mdpd only")
            return self.image.core.side_kept(), self.text.core.side_kept()
        return self.image.deployed(), self.text.deployed()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The towers' named groups, prefixed `image.` / `text.`."""
        out: dict[str, list[nn.Parameter]] = {}
        for tower, tuned in (("image", self.image), ("text", self.text)):
            for name, params in tuned.param_groups().items():
                out[f"{tower}.{name}"] = params
        return out


@torch.no_grad()
def encode(module: nn.Module, batches: Iterable[Any], device: torch.device | str = "cpu") -> Tensor:
    """L2-normalised embeddings of every batch, concatenated (module in eval mode, no grad)."""
    was = module.training
    module.eval()
    outs = [F.normalize(module(_to(batch, device)).float(), dim=-1).cpu() for batch in batches]
    module.train(was)
    return torch.cat(outs)


def _to(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if hasattr(x, "layers"):  # Precomputed
        return type(x)([t.to(device) for t in x.layers], None if x.mask is None else x.mask.to(device))
    return x
