"""What every side network is: detached per-layer backbone features in, per-layer side features out."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec


class SideOutput:
    """`layers[l]` is s_l (`B x N_l x D_S,l`, same token count as b_l); `tokens` feed the side head
    (`B x N x out_width`: the deepest layer's tokens, or one pooled token for UniPT's CLIP4Clip form).

    A network whose s_l lives on a coarser token layout than b_l (UniPT's CNN form, LST's pooled
    ladder) stores it there with `lifts[l]`, the resampling to b_l's tokens. Resampling is a convex
    combination of tokens (bilinear, average pooling, prefix means), so it commutes with every
    token-wise affine map f: `mapped(l, f) = lift(f(coarse))` equals `f(layers[l])` up to rounding,
    at the coarse grid's cost (the distillation applies phi's M_down this way).
    """

    def __init__(self, layers: list[Tensor], tokens: Tensor, lifts: list[Callable[[Tensor], Tensor] | None] | None = None):
        self.stored, self.tokens = list(layers), tokens
        self.lifts = list(lifts) if lifts is not None else [None] * len(self.stored)
        if len(self.lifts) != len(self.stored):
            raise ValueError(f"{len(self.lifts)} lifts for {len(self.stored)} layers")

    @property
    def layers(self) -> list[Tensor]:
        """s_1..s_L at b_l's token counts (materialises every lifted layer)."""
        return [self.layer(i) for i in range(len(self.stored))]

    def layer(self, index: int) -> Tensor:
        """s_l at b_l's token count."""
        return self.mapped(index, lambda t: t)

    def mapped(self, index: int, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """`fn(s_l)` for a token-wise affine `fn`, computed on the stored layout and then lifted."""
        lift = self.lifts[index]
        out = fn(self.stored[index])
        return out if lift is None else lift(out)


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
