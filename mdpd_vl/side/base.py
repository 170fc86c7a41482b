"""What every side network is: detached per-layer backbone features in, per-layer side features out."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from mdpd_vl.backbones.base import LayerSpec


@dataclass
class SideOutput:
    """`layers[l]` is s_l (`B x N_l x D_S,l`, same token count as b_l); `tokens` feed the side head."""

    layers: list[Tensor]
    tokens: Tensor


class SideNetwork(nn.Module):
    """Base class. Subclasses set `layer_widths` (D_S per layer) and `out_width` in `__init__`."""

    layer_widths: list[int]
    out_width: int

    def __init__(self, specs: list[LayerSpec]):
        super().__init__()
        if not specs:
            raise ValueError("the backbone exposes no layers: a side network needs at least one")
        self.specs = list(specs)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None) -> SideOutput:
        raise NotImplementedError
