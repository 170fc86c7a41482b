"""AdaLoRA (Zhang et al. 2023) through peft: SVD-form LoRA whose rank budget is reallocated in training.

Targets are LoRA's (`lora.lora_targets`) except open_clip's packed attention weight (peft's AdaLoRA
adapts modules, not parameters): the blocks' `nn.Linear` layers and dense `nn.Conv2d` layers.
What peft's `AdaLoraModel` does around a training step is done here without wrapping the model:
- the orthogonality regulariser (`orth_reg_weight` x mean ||P P^T - I||_F over every lora_A and
  lora_B) is the named loss 'orth_reg' of each training forward;
- the rank allocator (`RankAllocator.update_and_allocate`, peft's schedule: `tinit`, `tfinal`,
  `deltaT`, `total_step`) runs after every optimiser step, before `zero_grad`, through
  `distill/steps.py`, so it sees the step's gradients, in any training loop.
`method.peft.total_step` (the run's optimiser steps) is required, as in peft. Deployed merged.
Limitation: the allocator's importance averages are not in the state dict, so a resumed run
restarts them (the masks already applied are kept in the weights).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.distill.steps import watch_optimizer_steps
from mdpd_vl.errors import UserError
from mdpd_vl.tuning.config import MethodConfig
from mdpd_vl.tuning.lora import inject_peft, lora_targets, peft_config
from mdpd_vl.tuning.model import PeftTuned, TunedModel

ADAPTER = "default"


class AdaLoraTuned(PeftTuned):
    """PeftTuned + AdaLoRA's orthogonality loss and rank allocation once per optimiser step."""

    def __init__(self, backbone: Backbone, head: nn.Module, params: list[nn.Parameter], config: Any,
                 backbone_mode: str):
        from peft.tuners.adalora.layer import RankAllocator

        super().__init__("adalora", backbone, head, params, backbone_mode, extra_losses=self._orth_reg)
        self.config = config
        self._pairs = [(n, p) for n, p in backbone.named_parameters() if f"lora_A.{ADAPTER}" in n
                       or f"lora_B.{ADAPTER}" in n]
        self._allocator = [RankAllocator(backbone, config, ADAPTER)]  # a list: not a submodule
        self.optimizer_steps = 0
        watch_optimizer_steps(self)

    def _orth_reg(self) -> dict[str, Tensor]:
        terms = []
        for name, p in self._pairs:
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)))
        if not terms or not self.config.orth_reg_weight:
            return {}
        return {"orth_reg": self.config.orth_reg_weight * torch.stack(terms).mean()}

    def watched_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self._pairs[:1]]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """peft's `AdaLoraModel.update_and_allocate(global_step)`, on this model's backbone."""
        step, cfg, allocator = self.optimizer_steps, self.config, self._allocator[0]
        final = cfg.total_step - cfg.tfinal
        if step < final:
            _, pattern = allocator.update_and_allocate(self.backbone, step)
            if pattern:
                cfg.rank_pattern = pattern
        elif step == final:
            _, cfg.rank_pattern = allocator.update_and_allocate(self.backbone, step, force_mask=True)
            allocator.reset_ipt()
        elif cfg.rank_pattern:
            allocator.mask_using_rank_pattern(self.backbone, cfg.rank_pattern)
        self.optimizer_steps += 1


def build(backbone: Backbone, head_factory, cfg: MethodConfig) -> TunedModel:  # type: ignore[no-untyped-def]
    """AdaLoRA (initial rank `peft.init_r`, default lora_r + 4; target rank `peft.target_r`, default lora_r)."""
    from peft import AdaLoraConfig

    modules, _ = lora_targets(backbone)
    if not modules:
        raise UserError(f"no Linear or dense Conv2d layer in the blocks of {type(backbone).__name__}",
                        field="method.name")
    if "total_step" not in cfg.peft:
        raise UserError("AdaLoRA needs the run's optimiser steps: set method.peft.total_step", field="method.peft")
    values = {"init_r": cfg.lora_r + 4, "target_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0,
              "target_modules": modules, **cfg.peft}
    config = peft_config(AdaLoraConfig, values)
    params = inject_peft(backbone, config)
    return AdaLoraTuned(backbone, head_factory(backbone.widths[-1]), params, config, cfg.backbone_mode)
