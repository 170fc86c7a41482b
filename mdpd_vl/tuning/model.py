"""TunedModel: one interface over every tuning method (training forward, deployment, groups, counts).

Three shapes cover all methods:
- `HeadTuned`: backbone + head on b_L (linear, full, partial, bitfit, lora, adapter); the
  backbone runs without grad when nothing in it trains (linear).
- `SideTuned`: frozen backbone (no grad) + side network + side head, kept at inference.
- `MdpdTuned`: the DualPath; deployed = `fade()`.
Frozen backbone modes (`backbone_mode`): 'eval' runs the whole backbone in eval mode (frozen, so
deterministic teacher features), 'bn_eval' keeps only BatchNorm in eval (running statistics stay
frozen while dropout behaves as in training), 'train' leaves it alone (full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.distill.dualpath import DualPath, SideKeptModel
from mdpd_vl.export import FadedModel
from mdpd_vl.tuning.counts import count_params, unique_params

TaskLoss = Callable[[Tensor], Tensor]
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm under `module` in eval mode so its running statistics never change."""
    for m in module.modules():
        if isinstance(m, BN_TYPES):
            m.eval()


class TunedModel(nn.Module):
    """Base class: subclasses implement `backbone`, `train_forward`, `deployed` and `param_groups`."""

    method: str
    backbone_mode: str = "eval"

    @property
    def backbone(self) -> Backbone:
        """The (possibly modified, e.g. LoRA-injected) backbone."""
        raise NotImplementedError

    def train_forward(self, x: Any, task_loss: TaskLoss | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """(training output y, named weighted losses); `task_loss(y) -> scalar` is optional."""
        raise NotImplementedError

    def deployed(self) -> nn.Module:
        """The module that runs at inference."""
        raise NotImplementedError

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named, disjoint groups of the trainable parameters (empty groups included)."""
        raise NotImplementedError

    def forward(self, x: Any) -> Tensor:
        return self.train_forward(x)[0]

    def optimizer_groups(self, lr: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """The non-empty groups as `[{"name", "params"(, "lr")}]`, the engine's `param_groups` format."""
        out = []
        for name, params in self.param_groups().items():
            if params:
                group: dict[str, Any] = {"name": name, "params": params}
                if lr and name in lr:
                    group["lr"] = lr[name]
                out.append(group)
        return out

    @property
    def trainable_params(self) -> int:
        """Number of trained scalars (each tensor counted once)."""
        return count_params(p for group in self.param_groups().values() for p in group)

    @property
    def inference_params(self) -> int:
        """Number of scalars in the deployed module."""
        return count_params(self.deployed().parameters())

    def train(self, mode: bool = True) -> TunedModel:
        super().train(mode)
        if self.backbone_mode == "eval":
            self.backbone.eval()
        elif self.backbone_mode == "bn_eval":
            freeze_batchnorm(self.backbone)
        return self

    def _freeze_all_but_groups(self) -> None:
        """requires_grad from the explicit groups: everything else in this model is frozen."""
        self.requires_grad_(False)
        for params in self.param_groups().values():
            for p in params:
                p.requires_grad_(True)


class HeadTuned(TunedModel):
    """Backbone + head on the last layer; `groups(backbone, head)` names what trains."""

    def __init__(
        self,
        method: str,
        backbone: Backbone,
        head: nn.Module,
        backbone_groups: dict[str, list[nn.Parameter]],
        backbone_mode: str,
    ):
        super().__init__()
        self.method, self.backbone_mode = method, backbone_mode
        self.model = FadedModel(backbone, head)
        self._backbone_groups = {k: unique_params(v) for k, v in backbone_groups.items()}
        self._backbone_grad = any(self._backbone_groups.values())
        self._freeze_all_but_groups()
        self.train(self.training)

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**self._backbone_groups, "head": list(self.model.head.parameters())}

    def train_forward(self, x: Any, task_loss: TaskLoss | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._backbone_grad):
            feats = self.backbone.features(x)
        y = self.model.head(feats[-1], self.backbone.padding_mask(x))
        return y, ({"task": task_loss(y)} if task_loss is not None else {})

    def deployed(self) -> nn.Module:
        return self.model


class SideTuned(TunedModel):
    """Side-kept METL baselines: the side network and its head train and stay at inference."""

    def __init__(self, method: str, backbone: Backbone, side: nn.Module, head: nn.Module):
        super().__init__()
        self.method = method
        self.model = SideKeptModel(backbone, side, head)  # type: ignore[arg-type]
        self._freeze_all_but_groups()
        self.train(self.training)

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        side = [p for p in self.model.side.parameters() if id(p) not in backbone_ids]
        return {"side": side, "side_head": list(self.model.head.parameters())}

    def train_forward(self, x: Any, task_loss: TaskLoss | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.model(x)
        return y, ({"task": task_loss(y)} if task_loss is not None else {})

    def deployed(self) -> nn.Module:
        return self.model


class MdpdTuned(TunedModel):
    """MDPD: trains through the DualPath, deploys the faded backbone + W_B."""

    def __init__(self, dualpath: DualPath):
        super().__init__()
        self.method, self.core = "mdpd", dualpath

    @property
    def backbone(self) -> Backbone:
        return self.core.backbone

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.core.param_groups()

    def train_forward(self, x: Any, task_loss: TaskLoss | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.core(x, task_loss)
        return out.y_side, out.losses

    def train(self, mode: bool = True) -> MdpdTuned:
        nn.Module.train(self, mode)  # DualPath.train keeps its backbone in eval mode
        return self

    def deployed(self) -> nn.Module:
        return self.core.fade()
