"""What the faded student may change in the backbone (`DistillConfig.backbone_trainable`), and the
last-layer feature distillation side -> backbone (`feature_logits`). The fading-frontier axes, issue 16.

Every choice is an explicit list of tensors, selected by module type, never by name:
- `head`: nothing in the backbone (W_B only; the backbone runs without grad);
- `norms_last_k` / `norms_all`: the affine parameters of the norm layers in the last k / all blocks;
- `norms_biases`: those of every norm plus every bias inside the blocks (BitFit's set,
  `tuning.methods.block_biases`): the group `backbone_biases` holds the biases that are not norm
  parameters;
- `lowrank`: peft LoRA (rank `lowrank_r`, scale `lowrank_alpha / lowrank_r`) on the blocks' linear
  layers, found as `tuning.lora.lora_targets` finds them (group `backbone_lowrank`); `fade()`
  merges the deltas into a copy of the weights (`tuning.model.merged_copy`, peft `merge()` then every
  tuner layer replaced by its base layer), so the deployed model is the bare architecture.
The tuning imports are done inside the functions: `mdpd_vl.tuning` itself imports the distillation.
"""

from __future__ import annotations

from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.distill.losses import imitation_loss
from mdpd_vl.errors import UserError
from mdpd_vl.export import FadedModel
from mdpd_vl.heads.pooling import masked_mean
from mdpd_vl.side.base import SideOutput

# the backbone groups a DualPath may hold; `backbone_norms` is always present (possibly empty)
BACKBONE_GROUPS = ("backbone_norms", "backbone_biases", "backbone_lowrank")


def backbone_groups(cfg: DistillConfig, backbone: Backbone) -> dict[str, list[nn.Parameter]]:
    """The trainable backbone tensors of `cfg.backbone_trainable`, by group (LoRA is injected here, in place)."""
    choice = cfg.backbone_trainable
    if choice == "head":
        return {"backbone_norms": []}
    if choice == "norms_last_k":
        if cfg.last_k > backbone.num_layers:
            raise UserError(f"last_k={cfg.last_k} exceeds the backbone's {backbone.num_layers} blocks",
                            field="distill.last_k")
        return {"backbone_norms": [p for _, p in backbone.norm_parameters(last_k=cfg.last_k)]}
    norms = [p for _, p in backbone.norm_parameters()]
    if choice == "norms_all":
        return {"backbone_norms": norms}
    if choice == "norms_biases":
        from mdpd_vl.tuning.methods import block_biases

        in_norms = {id(p) for p in norms}
        return {"backbone_norms": norms, "backbone_biases": [p for p in block_biases(backbone) if id(p) not in in_norms]}
    if choice == "lowrank":
        from mdpd_vl.tuning.lora import inject_lora

        try:
            params = inject_lora(backbone, cfg.lowrank_r, cfg.lowrank_alpha)
        except UserError as err:  # name our field, not the method's
            raise UserError(str(err).split(": ", 1)[-1], field="distill.backbone_trainable") from None
        return {"backbone_norms": [], "backbone_lowrank": params}
    raise UserError(f"unknown choice {choice!r}", field="distill.backbone_trainable")


def faded(cfg: DistillConfig, backbone: Backbone, head: nn.Module) -> FadedModel:
    """The deployed backbone + W_B: with `lowrank`, a merged copy (the bare architecture, no tuner layer).
    A W_B that reads several layers serves in its folded form where that is cheaper (`LayerPoolHead.folded`):
    its folded map is a copy taken now, so fade again after training further."""
    folded = getattr(head, "folded", None)
    model = FadedModel(backbone, folded() if callable(folded) else head)
    if cfg.backbone_trainable != "lowrank":
        return model
    from mdpd_vl.tuning.model import merged_copy

    merged = merged_copy(model)
    # every module keeps its own mode (the frozen backbone in eval, dropout as `backbone_mode` says); a
    # merged tuner layer takes its place under the same name
    for name, module in merged.named_modules():
        try:
            module.training = model.get_submodule(name).training
        except AttributeError:
            pass
    return merged


class FeatureStudent(nn.Module):
    """The regressor of the last-layer feature distillation (FitNets-style, on the student's side):
    `Linear(D_B, D_S)` maps b_L to the side network's width; the side's last-layer tokens are the
    detached teacher. Part of the `distill` group: it is dropped at fading."""

    def __init__(self, backbone_width: int, side_width: int):
        super().__init__()
        self.proj = nn.Linear(backbone_width, side_width)

    def loss(self, b_last: Tensor, side: SideOutput, valid: Tensor | None) -> Tensor:
        """sum over tokens and channels of (t - proj(b_L))^2, mean over the batch (padding dropped), with t
        the side network's output tokens (what its head reads, detached). Where they have another token
        count than b_L (UniPT's one pooled token for CLIP4Clip), both sides are mean-pooled first."""
        teacher = side.tokens.detach().float()
        v = valid if valid is not None and valid.shape[1] == b_last.shape[1] else None
        student = self.proj(b_last).float()
        if teacher.shape[1] != student.shape[1]:
            teacher, student, v = teacher.mean(dim=1, keepdim=True), masked_mean(student, v).unsqueeze(1), None
        return imitation_loss(teacher, student, v)
