"""The paper's task head: global average pooling over valid tokens, then a linear map."""

from __future__ import annotations

from torch import Tensor, nn


def masked_mean(tokens: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the token axis of `B x N x D`, counting only tokens where `mask` (`B x N`) is True."""
    if mask is None:
        return tokens.mean(dim=1)
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


class GAPLinear(nn.Module):
    """y = W GAP(tokens): the W_B / W_S heads of the paper."""

    def __init__(self, in_width: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_width, out_dim)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.fc(masked_mean(tokens, mask))
