"""LoRA through peft, with targets found by module type inside the backbone's blocks.

- `nn.Linear` in the blocks (BERT query/key/value/dense, open_clip c_fc/c_proj, SE linears):
  `target_modules` (peft `lora.Linear`).
- `nn.MultiheadAttention` (open_clip towers): its packed q/k/v weight `in_proj_weight` through
  peft's `target_parameters` (a parametrisation: W + BA computed on the fly). peft's own
  MultiheadAttention layer is NOT used: it merges W + BA into the frozen weight before every
  forward and subtracts it after, which perturbs the frozen weight by rounding (measured: 2e-8
  after 5 steps), so frozen weights would not stay frozen. The attention output projection is
  therefore not adapted (nn.MultiheadAttention never calls its `forward`).
- CNNs: every dense convolution (`nn.Conv2d` with groups == 1, 1x1 and kxk alike; peft's conv
  LoRA is a kxk conv to rank r then a 1x1 conv back). Depthwise convs (groups > 1) are skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.errors import UserError


def lora_targets(backbone: Backbone) -> tuple[list[str], list[str]]:
    """(module names, parameter names) to adapt, relative to `backbone`, found by type in its blocks."""
    in_blocks = {id(m) for block in backbone.blocks for m in block.modules()}
    modules: list[str] = []
    params: list[str] = []
    inside_mha: set[int] = set()
    for name, module in backbone.named_modules():
        if id(module) not in in_blocks:
            continue
        if isinstance(module, nn.MultiheadAttention):
            params.append(f"{name}.in_proj_weight")
            inside_mha.update(id(m) for m in module.modules())
        elif isinstance(module, nn.Linear) and id(module) not in inside_mha:
            modules.append(name)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            modules.append(name)
    return modules, params


def inject_lora(backbone: Backbone, r: int, alpha: float) -> list[nn.Parameter]:
    """Add LoRA (rank r, scale alpha / r) to `backbone` in place; return the LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    modules, params = lora_targets(backbone)
    if not modules and not params:
        raise UserError(
            f"no Linear, dense Conv2d or MultiheadAttention layer in the blocks of {type(backbone).__name__}",
            field="method.name",
        )
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,  # peft's parameter targets do not support dropout
        target_modules=modules or [],
        target_parameters=params or None,
        bias="none",
    )
    with torch.no_grad():
        inject_adapter_in_model(config, backbone)
    out: list[nn.Parameter] = []
    for module in backbone.modules():
        if isinstance(module, LoraLayer):
            for holder in (module.lora_A, module.lora_B, module.lora_embedding_A, module.lora_embedding_B):
                out.extend(holder.parameters())
    return out
