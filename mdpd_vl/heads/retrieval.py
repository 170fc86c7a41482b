"""Two-tower retrieval pieces that other projects can import alone: the objective's config, the
cross-modal relational KL, and `encode` (L2-normalised embeddings of batches).

The model that composes two tuned towers (`DualTowerRetrieval`, which needs `mdpd_vl.tuning`) is
task-layer code: `mdpd_vl/tasks/retrieval.py`. For MDPD the backbone path of both towers learns
from the side path through, per `RetrievalConfig`:
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
