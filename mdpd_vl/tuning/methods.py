"""The method registry and `apply_method`. A new method = one builder (here or in its own file) + one
`METHODS.register` line at the bottom of this file.

A builder is `build(backbone, head_factory, cfg) -> TunedModel`; `head_factory(in_width)` returns a
fresh task head (`head(tokens, mask) -> Tensor`, e.g. `heads.pooling.GAPLinear(in_width, classes)`).
What trains is always an explicit list of tensors selected by module type, never by name pattern.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.errors import UserError
from mdpd_vl.registry import Registry
from mdpd_vl.tuning import adalora, ia3
from mdpd_vl.tuning.adapter import insert_adapters
from mdpd_vl.tuning.config import MethodConfig
from mdpd_vl.tuning.lora import inject_lora
from mdpd_vl.tuning.model import HeadTuned, MdpdTuned, PeftTuned, SideTuned, TunedModel

HeadFactory = Callable[[int], nn.Module]
Builder = Callable[[Backbone, HeadFactory, MethodConfig], TunedModel]

METHODS: Registry[Builder] = Registry("tuning method")


def apply_method(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Adapt `backbone` with method `cfg.name`; the backbone is modified in place (LoRA, adapters)."""
    if backbone.num_layers == 0:
        raise UserError("the backbone exposes no layers", field="backbone")
    build = METHODS.get(cfg.name, field="method.name")
    return build(backbone, head_factory, cfg)


def block_biases(backbone: Backbone) -> list[nn.Parameter]:
    """Bias vectors of every module inside the backbone's blocks (Linear/Conv/norm biases,
    nn.MultiheadAttention's `in_proj_bias`): BitFit's trainable set."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for block in backbone.blocks:
        for module in block.modules():
            for name, p in module.named_parameters(recurse=False):
                if (name == "bias" or name.endswith("_bias")) and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def build_linear(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Frozen backbone (run without grad), trained head: the floor every method must beat."""
    return HeadTuned("linear", backbone, head_factory(backbone.widths[-1]), {}, backbone_mode=cfg.backbone_mode)


def build_full(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Every backbone parameter trains (BatchNorm statistics too): nothing is frozen, so train mode."""
    groups = {"backbone": list(backbone.parameters())}
    return HeadTuned("full", backbone, head_factory(backbone.widths[-1]), groups, backbone_mode="train")


def build_partial(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Norm affine parameters inside the blocks + head (the backbone side of MDPD's norms_all)."""
    groups = {"norms": [p for _, p in backbone.norm_parameters()]}
    return HeadTuned("partial", backbone, head_factory(backbone.widths[-1]), groups, backbone_mode=cfg.backbone_mode)


def build_bitfit(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Bias terms inside the blocks + head."""
    groups = {"biases": block_biases(backbone)}
    return HeadTuned("bitfit", backbone, head_factory(backbone.widths[-1]), groups, backbone_mode=cfg.backbone_mode)


def build_lora(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """peft LoRA on the attention / MLP linears (dense convs for CNNs), see tuning/lora.py; deployed merged."""
    params = inject_lora(backbone, cfg.lora_r, cfg.lora_alpha)
    return PeftTuned("lora", backbone, head_factory(backbone.widths[-1]), params, cfg.backbone_mode)


def build_adapter(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Houlsby adapters after attention and MLP (after each block of a CNN stage), see tuning/adapter.py."""
    groups = {"adapter": insert_adapters(backbone, cfg.adapter_dim)}
    note = "unmerged: Houlsby adapters are nonlinear modules that cannot fold into the weights"
    return HeadTuned("adapter", backbone, head_factory(backbone.widths[-1]), groups, cfg.backbone_mode, note)


def _side_kept(name: str) -> Builder:
    def build(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
        from mdpd_vl.side import build_side

        side = build_side(name, backbone.layer_specs, cfg.side_config(), backbone=backbone)
        return SideTuned(name, backbone, side, head_factory(side.out_width), cfg.backbone_mode)

    build.__doc__ = f"Side-kept {name}: frozen backbone without grad, side network + head train and deploy."
    return build


def build_mdpd(backbone: Backbone, head_factory: HeadFactory, cfg: MethodConfig) -> TunedModel:
    """Masked Dual Path Distillation; deployed = the faded backbone + W_B."""
    from mdpd_vl.distill.dualpath import DualPath
    from mdpd_vl.side import build_side

    side = build_side(cfg.side_network, backbone.layer_specs, cfg.side_config(), backbone=backbone)
    dualpath = DualPath(backbone, side, head_factory(side.out_width), head_factory(backbone.widths[-1]), cfg.distill)
    return MdpdTuned(dualpath, cfg.backbone_mode)


METHODS.register("linear", build_linear)
METHODS.register("full", build_full)
METHODS.register("partial", build_partial)
METHODS.register("bitfit", build_bitfit)
METHODS.register("lora", build_lora)
METHODS.register("adalora", adalora.build)
METHODS.register("ia3", ia3.build)
METHODS.register("adapter", build_adapter)
METHODS.register("unipt", _side_kept("unipt"))
METHODS.register("sherl", _side_kept("sherl"))
METHODS.register("lst", _side_kept("lst"))
METHODS.register("mdpd", build_mdpd)
