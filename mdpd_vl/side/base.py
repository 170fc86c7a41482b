"""What every side network is: detached per-layer backbone features in, per-layer side features out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec


@dataclass
class SideOutput:
    """`layers[l]` is s_l (`B x N_l x D_S,l`, same token count as b_l); `tokens` feed the side head
    (`B x N x out_width`: the deepest layer's tokens, or one pooled token for UniPT's CLIP4Clip form)."""

    layers: list[Tensor]
    tokens: Tensor


class SideNetwork(nn.Module):
    """Base class. Subclasses set `layer_widths` (D_S per layer) and `out_width` in `__init__`.

    What a network reads from the backbone:
    - `reads_input`: it takes b_0, the input of the first block (transformer embeddings), as the
      `embeddings` argument of `forward` (the official UniPT / SHERL / LST read the embeddings);
    - `reads_layers`: how many of b_1..b_L it reads. SHERL reads L - k and re-runs the last k frozen
      blocks itself, so served alone (`SideKeptModel`) the backbone stops after block L - k.
    `forward` accepts more layers than it reads (MDPD passes all of them) and ignores the rest.
    """

    layer_widths: list[int]
    out_width: int
    reads_input: bool = False

    def __init__(self, specs: list[LayerSpec]):
        super().__init__()
        if not specs:
            raise ValueError("the backbone exposes no layers: a side network needs at least one")
        self.specs = list(specs)
        self.reads_layers = len(self.specs)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None, embeddings: Tensor | None = None) -> SideOutput:
        raise NotImplementedError

    def backbone_inputs(self, backbone: Backbone, x: Any) -> tuple[list[Tensor], Tensor | None]:
        """(b_1..b_m, b_0 or None): run `backbone` only as far as this network reads (call it without
        grad for a frozen backbone)."""
        feats = backbone.features(x, with_input=self.reads_input, num_layers=self.reads_layers)
        return (feats[1:], feats[0]) if self.reads_input else (feats, None)

    def _check_inputs(self, feats: list[Tensor], embeddings: Tensor | None) -> None:
        if len(feats) < self.reads_layers:
            raise ValueError(f"{type(self).__name__} reads {self.reads_layers} layers, got {len(feats)}")
        if self.reads_input and embeddings is None:
            raise ValueError(f"{type(self).__name__} reads b_0 (the embeddings): pass `embeddings`")


def reads_embeddings(backbone: Backbone | None, specs: list[LayerSpec]) -> LayerSpec | None:
    """The layout of b_0 when `backbone` exposes it in the token layout of `specs` (else None)."""
    spec = getattr(backbone, "input_spec", None)
    if spec is None or not specs or spec.grid != specs[0].grid or spec.prefix != specs[0].prefix:
        return None
    return spec
