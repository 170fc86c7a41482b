"""The ITR task model: an image tower and a text tower, each a tuned backbone + VSE head, trained
jointly (VSE-infinity) on image-caption pairs, on top of any tuning method, MDPD's dual path included.

The task loss couples the towers (a caption is matched against the images of the batch), so it is
computed here rather than inside a tower; the MDPD terms that couple them too (`cross_relational`,
`backbone_task`) are described in `mdpd_vl.heads.retrieval`. Lives in the task layer because it
composes `mdpd_vl.tuning` models (heads never import tuning/).

Several processes: the embeddings are gathered across processes (`mdpd_vl.dist.gather_batch`) before
every in-batch term (the VSE / InfoNCE task loss on both paths, the cross-modal relational KL), so
hardest negatives and softmaxes range over the global batch, as in one process with that batch. The
per-tower MDPD terms are means over samples and stay local (the engine averages them).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.dist import gather_batch
from mdpd_vl.heads.retrieval import RetrievalConfig, relational_kl_2d
from mdpd_vl.heads.vse_loss import info_nce, vse_loss
from mdpd_vl.tuning.model import MdpdTuned, TunedModel

__all__ = ["DualTowerRetrieval", "RetrievalConfig"]


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
            # side-only warm-up / alternate side steps: the backbone path gets no loss (it runs without grad)
            return out.y_side, None if out.phase == "side" else out.y_backbone, out.losses, out.y_teacher
        y, losses = tuned.train_forward(x)
        return y, None, losses, None

    def losses(self, images: Any, texts: Any, image_ids: Tensor | None = None) -> dict[str, Tensor]:
        """Named, weighted losses of one batch; their sum is the objective."""
        yi, bi, li, ti = self._tower(self.image, images)
        yt, bt, lt, tt = self._tower(self.text, texts)
        # the global batch for the in-batch terms (no-op in one process)
        yi, yt, bi, bt, ti, tt, image_ids = gather_batch(yi, yt, bi, bt, ti, tt, image_ids)
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
