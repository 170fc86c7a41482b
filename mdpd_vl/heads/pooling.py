"""The paper's task head: global average pooling over valid tokens, then a linear map."""

from __future__ import annotations

import torch
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

    def shift_map(self) -> Tensor:
        """M with head(tokens + v) = head(tokens) + M v for a per-sample v added to every token."""
        return self.fc.weight

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.fc(masked_mean(tokens, mask))


class LayerPoolHead(nn.Module):
    """A task head on the last layer that also reads pooled features of earlier layers.

    y = head(b_L + W [GAP(b_i1); ...; GAP(b_ik)], mask): the pooled features of layers i1..ik are
    mapped to b_L's width and added to every token of b_L before the task head, so any head
    (`head(tokens, mask)`, GAP + linear or VSE's GPO) keeps its own pooling. W starts at zero: at
    initialisation this is exactly `head` on the last layer (the paper's W_B). The layers are computed
    by the backbone anyway; the extra cost is one mean and one linear map per read layer.
    Called as `head(feats, mask)` with every layer's tokens (`reads_layers`; see
    `mdpd_vl.export.run_head`). Text layers share b_L's token count and padding mask; a layer with
    another token count (a CNN stage) is pooled over all its tokens.

    `after=True` adds the mapped features to the head's output instead: `folded()` turns a trained
    head into that form when the wrapped head is affine in a shift of its tokens (`shift_map`), the
    same function with W mapping to the head's output width rather than b_L's.
    """

    reads_layers = True

    def __init__(self, head: nn.Module | dict, layers: list[int], widths: list[int], out_width: int,
                 after: bool = False):
        super().__init__()
        self.after = after
        from mdpd_vl.export import build_head

        if len(layers) != len(widths) or not layers:
            raise ValueError(f"need one width per read layer, got layers {layers} and widths {widths}")
        self.head = build_head(head) if isinstance(head, dict) else head
        self.layers, self.widths = list(layers), list(widths)
        self.mix = nn.Linear(sum(widths), out_width)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)

    def spec(self) -> dict:
        """Recipe for `mdpd_vl.export` (the wrapped head's own spec inside)."""
        from mdpd_vl.export import head_spec

        kwargs = {"head": head_spec(self.head), "layers": self.layers, "widths": self.widths,
                  "out_width": self.mix.out_features, "after": self.after}
        return {"target": "mdpd_vl.heads.pooling:LayerPoolHead", "kwargs": kwargs}

    @torch.no_grad()
    def folded(self) -> LayerPoolHead:
        """The same function with W moved behind the head: head(b_L + W p) = head(b_L) + M W p for a head
        with `shift_map()` M, so the deployed W maps to the head's output width. Returned only where that
        width is the smaller one (fewer FLOPs at inference); otherwise `self`. Shares the wrapped head."""
        shift_map = getattr(self.head, "shift_map", None)
        m = shift_map() if callable(shift_map) and not self.after else None
        if m is None or m.shape[0] >= self.mix.out_features:
            return self
        out = LayerPoolHead(self.head, self.layers, self.widths, m.shape[0], after=True)
        out.to(device=self.mix.weight.device, dtype=self.mix.weight.dtype)
        out.mix.weight.copy_(m @ self.mix.weight)
        out.mix.bias.copy_(m @ self.mix.bias)
        return out.train(self.training)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None) -> Tensor:
        last = feats[-1]
        pooled = []
        for i in self.layers:
            t = feats[i]
            pooled.append(masked_mean(t, mask if mask is not None and mask.shape[1] == t.shape[1] else None))
        shift = self.mix(torch.cat(pooled, dim=-1).to(last.dtype))
        if self.after:
            y = self.head(last, mask)
            return y + shift.to(y.dtype)
        return self.head(last + shift.unsqueeze(1), mask)
