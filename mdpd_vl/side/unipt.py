"""UniPT (CVPR 2024): fuse every backbone layer into the deepest one with parameter-free attention.

Per layer l: s_l = Linear(D_l -> D_l // r)(b_l) (the side feature MDPD distils, same tokens as
b_l), then t_l = map to the shared fusion width d (identity when D_l // r == d, the default for
equal-width transformers). The deepest layer t_L is the anchor a. For every layer,
merged_l = l1norm(relu(a t_l^T)) t_l + mean(t_l): each anchor token gathers the target tokens it
agrees with (padding masked out; token counts may differ, e.g. CNN stages), plus the target's
pooled token (the original adds the target's class token, which not every backbone has). A learned
confidence Linear(d, 1)(mean(a) * mean(t_l)), softmaxed over layers, weights the merged features;
output = b_L + up(merged) (up = ReLU -> Linear(d, D_L)), then ReLU -> Linear to `out_width`.
Grid layers finer than the anchor (early CNN stages) are average-pooled onto the anchor's grid
before the map to d; s_l keeps every token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.heads.pooling import masked_mean
from mdpd_vl.side.base import SideNetwork, SideOutput
from mdpd_vl.side.config import UniPTConfig
from mdpd_vl.side.lst import mask_for, resample_tokens


def l1norm(x: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    """x divided by its L1 norm along `dim` (rows that are all zero stay zero)."""
    return x / x.abs().sum(dim=dim, keepdim=True).clamp_min(eps)


def cross_gather(anchor: Tensor, target: Tensor, target_mask: Tensor | None) -> Tensor:
    """l1norm(relu(anchor target^T)) target: the anchor layout (`B x N_a x d`) filled from the target."""
    weights = torch.relu(anchor @ target.transpose(1, 2))
    if target_mask is not None:
        weights = weights * target_mask[:, None, :].to(weights.dtype)
    return l1norm(weights, dim=-1) @ target


class UniPT(SideNetwork):
    """UniPT side network; see the module docstring."""

    def __init__(self, specs: list[LayerSpec], cfg: UniPTConfig | None = None, backbone: Backbone | None = None):
        super().__init__(specs)
        cfg = cfg if cfg is not None else UniPTConfig()
        cfg.validate(self.specs)
        self.cfg = cfg
        d = cfg.side_width(self.specs)
        deepest = self.specs[-1].width
        self.layer_widths = [s.width // cfg.r for s in self.specs]
        self.out_width = cfg.output_width(self.specs)
        self.proj = nn.ModuleList(nn.Linear(s.width, w) for s, w in zip(self.specs, self.layer_widths))
        self.to_d = nn.ModuleList(nn.Identity() if w == d else nn.Linear(w, d) for w in self.layer_widths)
        # no bias: a shift shared by all layers cancels in the softmax, so it would never train
        self.confidence = nn.Linear(d, 1, bias=False)
        self.up = nn.Sequential(nn.ReLU(), nn.Linear(d, deepest))
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(deepest, self.out_width))

    def forward(self, feats: list[Tensor], mask: Tensor | None = None) -> SideOutput:
        if len(feats) != len(self.specs):
            raise ValueError(f"UniPT expects {len(self.specs)} layers, got {len(feats)}")
        side = [proj(b) for proj, b in zip(self.proj, feats)]
        targets = [to_d(self._coarsen(s, spec, feats[-1].shape[1])) for to_d, s, spec in zip(self.to_d, side, self.specs)]
        anchor = targets[-1]
        anchor_pool = masked_mean(anchor, mask_for(mask, anchor.shape[1]))
        merged, confidence = [], []
        for t in targets:
            t_mask = mask_for(mask, t.shape[1])
            t_pool = masked_mean(t, t_mask)
            merged.append(cross_gather(anchor, t, t_mask) + t_pool[:, None, :])
            confidence.append(self.confidence(anchor_pool * t_pool))
        weights = torch.softmax(torch.cat(confidence, dim=1), dim=1)  # B x L
        fused = torch.einsum("bl,blnd->bnd", weights, torch.stack(merged, dim=1))
        tokens = self.out(feats[-1] + self.up(fused))
        return SideOutput(layers=side, tokens=tokens)

    def _coarsen(self, s: Tensor, spec: LayerSpec, n_anchor: int) -> Tensor:
        """Average-pool a grid layer finer than the anchor onto the anchor's grid before fusion.

        Early CNN stages have hundreds of times the anchor's tokens (EfficientNet at 128 px: 4096
        vs 16); mapping them all to width d costs far more than the whole backbone, while the
        cross-attention only ever gathers them into the anchor's tokens. s_l itself (what MDPD
        distils) keeps every token. Transformers (equal token counts) are untouched."""
        anchor = self.specs[-1]
        if spec.grid is None or anchor.grid is None or s.shape[1] <= n_anchor:
            return s
        return resample_tokens(s, spec, anchor, n_anchor)
