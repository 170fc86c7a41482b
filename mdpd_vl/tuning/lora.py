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

Deployed merged (`model.PeftTuned`): a copy of the backbone with every delta folded into its
weight, the bare architecture, as a user serves LoRA after `merge_and_unload`.
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


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors peft added to `model` (each tuner layer's `adapter_layer_names`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for attr in module.adapter_layer_names:
                for p in getattr(module, attr).parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append(p)
    return out


def inject_peft(backbone: Backbone, config: object, field: str = "method.peft") -> list[nn.Parameter]:
    """Inject any peft tuner config into `backbone` in place; return its new parameters."""
    from peft import inject_adapter_in_model

    try:
        with torch.no_grad():
            inject_adapter_in_model(config, backbone)  # type: ignore[arg-type]
    except (ValueError, TypeError) as err:
        raise UserError(f"peft refused the config: {err}", field=field) from None
    return adapter_parameters(backbone)


def peft_config(cls: type, values: dict, field: str = "method.peft") -> object:
    """`cls(**values)` (a peft config), with a bad or missing key reported as one UserError.

    `method.peft` is shared by the peft methods (one `--compare` run sets it once for all): a key
    that only another of them takes (AdaLoRA's `total_step` for an IA3 run) is left out; a key
    that none takes is an error."""
    import dataclasses

    from peft import AdaLoraConfig, IA3Config, LoraConfig

    own = {f.name for f in dataclasses.fields(cls)}
    other = {f.name for c in (AdaLoraConfig, IA3Config, LoraConfig) for f in dataclasses.fields(c)}
    unknown = sorted(set(values) - own - other)
    if unknown:
        raise UserError(f"unknown peft config key(s) {', '.join(unknown)}", field=field)
    values = {k: v for k, v in values.items() if k in own}
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise UserError(str(err).split("\n")[0], field=field) from None


def inject_lora(backbone: Backbone, r: int, alpha: float) -> list[nn.Parameter]:
    """Add LoRA (rank r, scale alpha / r) to `backbone` in place; return the LoRA parameters."""
    from peft import LoraConfig

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
    return inject_peft(backbone, config)
