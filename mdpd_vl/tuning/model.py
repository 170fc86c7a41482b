"""TunedModel: one interface over every tuning method (training forward, deployment, groups, counts).

Four shapes cover all methods:
- `HeadTuned`: backbone + head on b_L (linear, full, partial, bitfit, adapter); the backbone runs
  without grad when nothing in it trains (linear).
- `PeftTuned`: a HeadTuned whose peft deltas (LoRA, AdaLoRA, IA3) are merged into a copy of the
  weights for deployment, as a user deploys them (`merge_and_unload`).
- `SideTuned`: frozen backbone (no grad) + side network + side head, kept at inference.
- `MdpdTuned`: the DualPath; deployed = `fade()`.
Frozen backbone mode (`backbone_mode`, from `MethodConfig.backbone_mode`, ONE setting for every
method's frozen parts): 'eval' (default) runs the backbone in eval mode (dropout off, BatchNorm
statistics frozen, deterministic features), 'bn_eval' keeps only BatchNorm in eval (dropout as in
training: the official VSE-infinity / LST recipes); full fine-tuning uses 'train' (nothing is frozen).
`backbone_mode` and `deployment` are recorded on every tuned model so tables can say which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.distill.dualpath import DualPath, SideKeptModel, set_frozen_mode
from mdpd_vl.export import FadedModel
from mdpd_vl.tuning.counts import count_params, unique_params

TaskLoss = Callable[[Tensor], Tensor]


class TunedModel(nn.Module):
    """Base class: subclasses implement `backbone`, `train_forward`, `deployed` and `param_groups`.

    `deployment` says in words what `deployed()` serves (merged, unmerged, side kept, faded)."""

    method: str
    backbone_mode: str = "eval"
    deployment: str = "backbone + head as trained"

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
        set_frozen_mode(self.backbone, self.backbone_mode, mode)
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
        deployment: str | None = None,
    ):
        super().__init__()
        self.method, self.backbone_mode = method, backbone_mode
        if deployment is not None:
            self.deployment = deployment
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


class PeftTuned(HeadTuned):
    """A peft method whose deltas merge into the weights: deployed merged, like a user deploys it.

    `deployed()` merges into a COPY (`Backbone.clone()`; peft `merge()` then every tuner layer replaced
    by its base layer), so training goes on unaffected; the copy has the bare backbone's parameters.
    """

    deployment = "merged: the peft deltas are folded into the weights (the bare architecture)"

    def __init__(self, method: str, backbone: Backbone, head: nn.Module, params: list[nn.Parameter],
                 backbone_mode: str, extra_losses: Callable[[], dict[str, Tensor]] | None = None):
        super().__init__(method, backbone, head, {method: params}, backbone_mode)
        self._extra_losses = extra_losses

    def train_forward(self, x: Any, task_loss: TaskLoss | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        y, losses = super().train_forward(x, task_loss)
        if self._extra_losses is not None and self.training and torch.is_grad_enabled():
            losses.update(self._extra_losses())
        return y, losses

    def deployed(self) -> nn.Module:
        return merged_copy(self.model)

    @property
    def inference_params(self) -> int:
        """The merged model's count (no copy needed): every parameter but what the tuner layers add."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        added: set[int] = set()
        for m in self.model.modules():
            if isinstance(m, BaseTunerLayer):
                base = {id(p) for p in m.get_base_layer().parameters()}
                added.update(id(p) for p in m.parameters() if id(p) not in base)
        return count_params(p for p in self.model.parameters() if id(p) not in added)


@torch.no_grad()
def merged_copy(model: FadedModel) -> FadedModel:
    """A FadedModel over a copy of `model`'s backbone with every peft tuner layer merged and unloaded."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    backbone = model.backbone.clone()
    for module in backbone.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent, _, attr = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, attr, module.get_base_layer())
    merged = FadedModel(backbone, copy.deepcopy(model.head))
    merged.train(model.training)
    return merged


class SideTuned(TunedModel):
    """Side-kept METL baselines: the side network and its head train and stay at inference."""

    deployment = "side network kept: backbone + side network + side head"

    def __init__(self, method: str, backbone: Backbone, side: nn.Module, head: nn.Module, backbone_mode: str = "eval"):
        super().__init__()
        self.method, self.backbone_mode = method, backbone_mode
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

    deployment = "faded: backbone + W_B only (the bare architecture)"

    def __init__(self, dualpath: DualPath, backbone_mode: str = "eval"):
        super().__init__()
        self.method, self.core = "mdpd", dualpath
        self.backbone_mode = backbone_mode
        dualpath.set_backbone_mode(backbone_mode)

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
