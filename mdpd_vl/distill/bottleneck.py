"""The low-rank bottleneck phi that maps a side feature (width D_S) to the backbone's width D_B."""

from __future__ import annotations

from torch import Tensor, nn


class Bottleneck(nn.Module):
    """phi(s) = (s M_down + b_down) M_up + b_up  (paper eq. 1).

    M_down: D_S x d and M_up: d x D_B both carry a bias, so the module has exactly
    (1 + D_S + D_B) d + D_B parameters, the count the paper quotes, instead of the
    (1 + D_B) D_S of a 1x1 convolution.
    """

    def __init__(self, in_width: int, d: int, out_width: int):
        super().__init__()
        self.down = nn.Linear(in_width, d)
        self.up = nn.Linear(d, out_width)

    @staticmethod
    def num_params(in_width: int, d: int, out_width: int) -> int:
        """Analytic parameter count (1 + D_S + D_B) d + D_B."""
        return (1 + in_width + out_width) * d + out_width

    def forward(self, s: Tensor) -> Tensor:
        return self.up(self.down(s))
