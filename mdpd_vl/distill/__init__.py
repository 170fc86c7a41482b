"""Dual-path distillation: bottleneck phi, masked generation G, the losses and the DualPath core.

See distill/README.md and mdpd_vl/README.md for the contracts.
"""

from mdpd_vl.distill.bottleneck import Bottleneck
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.distill.dualpath import DualPath, DualPathOutput, SideKeptModel
from mdpd_vl.distill.generation import GenerationBlock, draw_token_mask
from mdpd_vl.export import FadedModel

__all__ = [
    "Bottleneck",
    "DistillConfig",
    "DualPath",
    "DualPathOutput",
    "FadedModel",
    "GenerationBlock",
    "SideKeptModel",
    "draw_token_mask",
]
