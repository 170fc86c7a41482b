"""IA3 (Liu et al. 2022) through peft: learned vectors that rescale activations, merged at deployment.

Targets are found by type inside the backbone's blocks (as for LoRA, `lora.lora_targets`): every
`nn.Linear` outside `nn.MultiheadAttention` and every dense `nn.Conv2d`. A Linear that narrows the
width (in > out: the MLP's down projection, BERT `output.dense`, open_clip `c_proj`) is a peft
feed-forward module: its INPUT (the MLP's hidden activation) is rescaled, as IA3 rescales the FF
activations; every other target has its output rescaled. Deviation (named): IA3 rescales only keys
and values in attention; layers found by type cannot tell q from k, so every attention projection
of HF layers is rescaled, and open_clip's packed `in_proj` (not a module) is not adapted.
Vectors start at 1: the tuned model starts equal to the backbone.
"""

from __future__ import annotations

from torch import nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.errors import UserError
from mdpd_vl.tuning.config import MethodConfig
from mdpd_vl.tuning.lora import inject_peft, lora_targets, peft_config
from mdpd_vl.tuning.model import PeftTuned, TunedModel


def build(backbone: Backbone, head_factory, cfg: MethodConfig) -> TunedModel:  # type: ignore[no-untyped-def]
    """IA3 on the blocks' Linear / dense Conv2d layers + head; deployed merged."""
    from peft import IA3Config

    modules, _ = lora_targets(backbone)
    if not modules:
        raise UserError(f"no Linear or dense Conv2d layer in the blocks of {type(backbone).__name__}",
                        field="method.name")
    feedforward = [n for n in modules if isinstance(m := backbone.get_submodule(n), nn.Linear)
                   and m.in_features > m.out_features]
    values = {"target_modules": modules, "feedforward_modules": feedforward, **cfg.peft}
    params = inject_peft(backbone, peft_config(IA3Config, values))
    return PeftTuned("ia3", backbone, head_factory(backbone.widths[-1]), params, cfg.backbone_mode)
