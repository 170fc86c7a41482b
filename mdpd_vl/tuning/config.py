"""MethodConfig: which tuning method, and the knobs of every method in one flat dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.distill.dualpath import BACKBONE_MODES
from mdpd_vl.errors import UserError


@dataclass
class MethodConfig:
    """How a backbone is adapted (see tuning/README.md for each method)."""

    name: str = field(
        default="mdpd",
        metadata={"help": "linear | full | partial | bitfit | lora | adalora | ia3 | adapter | unipt | sherl | "
                  "lst | mdpd (tuning/README.md)"},
    )
    backbone_mode: str = field(
        default="eval",
        metadata={"help": "mode of every method's frozen backbone parts: eval (dropout off, BatchNorm frozen) or "
                  "bn_eval (dropout as in training, BatchNorm frozen: the official VSE-infinity / LST recipes); "
                  "full fine-tuning always trains in train mode"},
    )
    side_network: str = field(
        default="unipt", metadata={"help": "side network of mdpd: unipt | sherl | lst"}
    )
    side: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "extra side-network config keys (see side/config.py); r and d below fill in"},
    )
    r: int = field(default=2, metadata={"help": "side reduction factor: D_S = D_B // r (paper: 2 for VL)"})
    d: int | None = field(
        default=None, metadata={"help": "side fusion/ladder width; null = deepest backbone width // r"}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)"})
    adapter_dim: int = field(
        default=64, metadata={"help": "Houlsby adapter bottleneck width (capped at the site width)"}
    )
    peft: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "extra keyword arguments of the peft config of adalora / ia3 (e.g. adalora: total_step "
                  "(required: optimiser steps of the run), init_r, target_r, tinit, tfinal, deltaT, orth_reg_weight)"},
    )
    distill: DistillConfig = field(
        default_factory=DistillConfig, metadata={"help": "dual-path distillation settings (mdpd only)"}
    )

    def __post_init__(self) -> None:
        from mdpd_vl.tuning.methods import METHODS  # the registry imports this module

        METHODS.get(self.name, field="name")
        for name in ("r", "lora_r", "adapter_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"must be a positive integer, got {value!r}", field=name)
        if self.d is not None and (not isinstance(self.d, int) or self.d < 1):
            raise UserError(f"must be a positive integer or null, got {self.d!r}", field="d")
        if not self.lora_alpha > 0:
            raise UserError(f"must be > 0, got {self.lora_alpha!r}", field="lora_alpha")
        if self.backbone_mode not in BACKBONE_MODES:
            raise UserError(f"unknown mode {self.backbone_mode!r}; valid: {', '.join(BACKBONE_MODES)}",
                            field="backbone_mode")
        if not isinstance(self.peft, dict):
            raise UserError(f"must be a mapping of peft config keys, got {self.peft!r}", field="peft")
        if isinstance(self.distill, dict):
            self.distill = DistillConfig.from_dict(self.distill)

    def for_tower(self, tower: str, towers: tuple[str, ...]) -> MethodConfig:
        """The config one tower of a task with `towers` is built with (`distill.for_tower`)."""
        distill = self.distill.for_tower(tower, towers)
        return self if distill is self.distill else replace(self, distill=distill)

    def side_config(self) -> dict[str, Any]:
        """The side-network config dict: `side` plus r and d (explicit `side` keys win)."""
        out: dict[str, Any] = {"r": self.r}
        if self.d is not None:
            out["d"] = self.d
        out.update(self.side)
        return out
