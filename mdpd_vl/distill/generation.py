"""Masked generation (paper sec. 3.3): per-sample token masks and the generation block G.

Layout conventions (tokens are `B x N x D`, see `backbones/base.py`):
- Image layers have a patch grid (`LayerSpec.grid_for(N)`) plus `prefix` non-grid tokens (a ViT
  class token). G runs Conv3x3 -> ReLU -> Conv3x3 over the grid. Prefix tokens have no
  neighbours, so they take a per-token path that uses the SAME weights: a 3x3 conv with zero
  padding applied to a 1x1 map only sees its centre tap, so the prefix path is
  `centre2(relu(centre1(x)))` - no extra parameters.
- Text layers have no grid: G is Conv1d(k=3) -> ReLU -> Conv1d(k=3) along the sequence.
- Prefix tokens are never masked: a per-token path cannot regenerate a token from its
  neighbours, so masking it would only teach G a constant. The ratio lambda applies to grid
  (or sequence) tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.backbones.base import LayerSpec


def draw_token_mask(
    batch: int, num_tokens: int, ratio: float, generator: torch.Generator, prefix: int = 0
) -> Tensor:
    """`B x N` bool mask, True = replace by the mask token: m_i = 1 iff r_i < lambda (eq. 5).

    Drawn on the CPU from `generator` (so masks are reproducible on any device); the first
    `prefix` tokens are never masked.
    """
    r = torch.rand(batch, num_tokens, generator=generator)
    mask = r < ratio
    if prefix:
        mask[:, :prefix] = False
    return mask


class GenerationBlock(nn.Module):
    """G: regenerate the backbone's tokens from masked, width-aligned side tokens."""

    def __init__(self, spec: LayerSpec, hidden: int):
        super().__init__()
        self.spec = spec
        width = spec.width
        if spec.grid is None:
            self.conv1: nn.Module = nn.Conv1d(width, hidden, kernel_size=3, padding=1)
            self.conv2: nn.Module = nn.Conv1d(hidden, width, kernel_size=3, padding=1)
        else:
            self.conv1 = nn.Conv2d(width, hidden, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(hidden, width, kernel_size=3, padding=1)

    @staticmethod
    def num_params(width: int, hidden: int, text: bool) -> int:
        """Analytic count: two convs (3 taps for text, 3x3 for grids), both with bias."""
        taps = 3 if text else 9
        return taps * width * hidden + hidden + taps * hidden * width + width

    def forward(self, tokens: Tensor) -> Tensor:
        """`B x N x D` -> `B x N x D`."""
        b, n, d = tokens.shape
        grid = self.spec.grid_for(n)
        if grid is None:
            x = tokens.transpose(1, 2)  # B x D x N
            return self.conv2(F.relu(self.conv1(x))).transpose(1, 2)
        p = n - grid[0] * grid[1]
        body = tokens[:, p:].transpose(1, 2).reshape(b, d, grid[0], grid[1])
        out = self.conv2(F.relu(self.conv1(body))).flatten(2).transpose(1, 2)
        if p == 0:
            return out
        head = self._centre(self.conv2, F.relu(self._centre(self.conv1, tokens[:, :p])))
        return torch.cat([head, out], dim=1)

    @staticmethod
    def _centre(conv: nn.Module, x: Tensor) -> Tensor:
        """A 3x3 conv applied to isolated tokens (1x1 maps with zero padding) = its centre tap."""
        weight = conv.weight[:, :, 1, 1]  # type: ignore[index]
        return F.linear(x, weight, conv.bias)  # type: ignore[arg-type]
