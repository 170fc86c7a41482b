"""UniPT (CVPR 2024): fuse every backbone layer into one anchor with parameter-free cross-attention.

Two official forms, chosen by `UniPTConfig.variant`:

**vse** (default; Paranioar/UniPT `VSE-infty/lib/adapter_for_transformer.py` and `adapter_for_cnn.py`,
class `Our_tuning_for_transformer` / `Our_tuning_for_resnet`), for image-text retrieval:
- token hosts (transformers: every layer in one token layout). Sources are b_0 (the embeddings,
  when the backbone exposes them, as the official 13 BERT states do), b_1..b_L. Each source is
  projected, t_l = LN(Linear(D_l -> d)(b_l)); the anchor is t_L. For every other source (the anchor
  is not fused with itself), merged_l = (l1norm(relu(t_L t_l^T)) + I) t_l: each anchor token gathers
  the target tokens it agrees with (padding masked out) plus the target token at its own position
  (the official `+ torch.eye`). A confidence Linear(d, 1)(mean(t_L) * mean(t_l)), softmaxed over the
  sources, weights the merged features; out = t_L + LN(Linear(d, d)(merged)); tokens =
  Linear(d -> out_width)(relu(out)).
- CNN-stage hosts (layers with different grids): t_L = BN(conv1x1(b_L)). A shallower stage is first
  pooled onto the anchor grid by anchor-guided pooling: g = relu(conv1x1(b_L -> C_l)) is spread over
  each anchor cell's rh x rw patch of b_l, the score sum_c(g * b_l) is L1-normalised (after relu)
  within the patch and 1 / (rh rw) is added; the patch is summed with these weights; then
  t_l = BN(conv1x1(C_l -> d)). Fusion, output and projections as above, with BN in place of LN.
**clip4clip** (`CLIP4Clip/modules/module_adapter.py`), for video retrieval: every source,
b_L included, is a target, t_l = Linear(d)(relu(b_l)) without LN; the anchor is one token,
a = Linear(D_L -> d)(relu(class token of b_L)); merged_l = l1norm(relu(a t_l^T)) t_l + class token of
t_l; tokens = class token of b_L + Linear(d -> D_L)(relu(merged)) (one token per sample).

s_l (what MDPD distils into b_l) is t_l for l = 1..L, upsampled back to b_l's grid in the CNN form.

Layers without a grid may differ in token count (MDETR as a backbone: encoder layers hold the memory,
image + text tokens; decoder layers the queries; `backbones/mdetr.py`). Such a target cannot take the `+ I`
(or clip4clip's `+ class token`) term, which pairs tokens by position: it is gathered onto the anchor by the
parameter-free cross-attention alone, as the official `MDETR/models/transformer.py` gathers the side memory
into the query layout (`cross_attention(..., residual=False)`). Layers of the anchor's token count (every
layer of an ordinary transformer) are fused exactly as above.

Deviations, all forced by reading layers of any backbone rather than one model's internals:
- clip4clip's anchor is the class token of b_L (the image prefix token; for text the first token, or
  the last valid one = CLIP's EOT with `class_token: last`/auto on causal towers); the official anchor
  is CLIP's projected output embedding, which is not among the layers.
- CNN stages whose grid is not an integer multiple of the anchor's are bilinearly resized to the
  nearest multiple before the patch pooling (the official rates are fixed at 8/4/2 for 512 px ResNets).
  A stage already on the anchor's grid (EfficientNet's late stages; the official ResNet has none
  besides the anchor) is taken as it is: over a 1 x 1 patch the official weights reduce to a step
  function of the guide's sign, which passes no gradient to its guide projection.
- on MDETR, the official file fuses the encoder layers into the last encoder memory and each decoder layer
  (plus what it gathers from that side memory) into the last decoder output; here every layer fuses into
  the one anchor b_L (the decoder output), the memory layers by cross-attention as described above: the
  backbone protocol gives one list of layers, not two towers.
- `out_width` defaults to the deepest backbone width (the official maps to the joint embedding size
  and pools it directly; here the task head maps to the joint space). A clip4clip `out_width` other
  than D_L adds a Linear after the official output.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.heads.pooling import masked_mean
from mdpd_vl.side.base import SideNetwork, SideOutput, reads_embeddings
from mdpd_vl.side.blocks import is_causal
from mdpd_vl.side.config import UniPTConfig
from mdpd_vl.side.lst import mask_for, resample_tokens


def l1norm(x: Tensor, dim: int | tuple[int, ...], eps: float = 1e-6) -> Tensor:
    """x divided by its L1 norm along `dim` (rows that are all zero stay zero)."""
    return x / x.abs().sum(dim=dim, keepdim=True).clamp_min(eps)


def cross_gather(anchor: Tensor, target: Tensor, target_mask: Tensor | None) -> Tensor:
    """l1norm(relu(anchor target^T)) target: the anchor layout (`B x N_a x d`) filled from the target."""
    weights = anchor @ target.transpose(1, 2)
    if target_mask is not None:
        weights = weights * target_mask[:, None, :].to(weights.dtype)
    return l1norm(torch.relu(weights), dim=-1) @ target


def gather_onto(anchor: Tensor, target: Tensor, target_mask: Tensor | None, identity: bool) -> Tensor:
    """`target` in the anchor's token layout (`B x N_a x d`) for the fusion.

    Same token count: `cross_gather + target` with `identity` (UniPT's `+ I`), else `target` itself (SHERL's
    per-token fusion). Another token count and no grid (MDETR's memory, image + text, beside its decoder
    queries): only the parameter-free cross-attention `cross_gather`, as the official
    Paranioar/UniPT `MDETR/models/transformer.py` brings the side memory to the queries
    (`cross_attention(..., residual=False)`: no identity term, there is no token at the same position)."""
    if target.shape[1] == anchor.shape[1]:
        return cross_gather(anchor, target, target_mask) + target if identity else target
    return cross_gather(anchor, target, target_mask)


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channels of `B x N x C` tokens: the BN after a 1x1 conv of a CNN form."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def same_layout(specs: list[LayerSpec]) -> bool:
    """True when every layer has the first one's token layout (a transformer)."""
    return all(s.grid == specs[0].grid and s.prefix == specs[0].prefix for s in specs)


def is_token_layout(specs: list[LayerSpec], tokens: list[Tensor]) -> bool:
    return same_layout(specs) and len({t.shape[1] for t in tokens}) == 1


def _confidence_gate(d: int) -> nn.Linear:
    """The per-source confidence score. One gate serves every source and a softmax over the sources is
    shift-invariant, so a bias could never get a gradient: it is dropped. It is created and then removed
    so that the modules built after it draw the same initial weights as before."""
    gate = nn.Linear(d, 1)
    gate.bias = None
    return gate


class _Fusion(nn.Module):
    """The shared VSE-infinity fusion: confidence-weighted cross-attention of targets into the anchor."""

    def __init__(self, d: int, out_width: int, norm: type[nn.Module]):
        super().__init__()
        self.gate = _confidence_gate(d)
        self.proj = nn.Sequential(nn.Linear(d, d), norm(d))
        self.up = nn.Sequential(nn.ReLU(), nn.Linear(d, out_width))

    def forward(self, anchor: Tensor, targets: list[Tensor], mask: Tensor | None) -> Tensor:
        pooled = masked_mean(anchor, mask_for(mask, anchor.shape[1]))
        if not targets:
            return self.up(anchor)
        merged, confidence = [], []
        for t in targets:
            t_mask = mask_for(mask, t.shape[1])
            # + I: each anchor token also takes the target token at its own position; a target with
            # another token count has no such position (see `gather_onto`)
            merged.append(gather_onto(anchor, t, t_mask, identity=True))
            confidence.append(self.gate(pooled * masked_mean(t, t_mask)))
        weights = torch.softmax(torch.cat(confidence, dim=1), dim=1)  # B x sources
        fused = torch.einsum("bl,blnd->bnd", weights, torch.stack(merged, dim=1))
        return self.up(anchor + self.proj(fused))


class UniPT(SideNetwork):
    """UniPT side network; see the module docstring."""

    def __init__(self, specs: list[LayerSpec], cfg: UniPTConfig | None = None, backbone: Backbone | None = None):
        super().__init__(specs)
        cfg = cfg if cfg is not None else UniPTConfig()
        cfg.validate(self.specs)
        self.cfg = cfg
        d = cfg.side_width(self.specs)
        deepest = self.specs[-1].width
        self.out_width = cfg.output_width(self.specs)
        self.layer_widths = [d] * len(self.specs)
        self.grid_form = cfg.variant == "vse" and not same_layout(self.specs)
        if self.grid_form and any(s.grid is None or s.prefix for s in self.specs):
            raise cfg.error("variant", "the CNN form needs grid layers without prefix tokens (or one token layout)")
        if cfg.variant == "clip4clip" and not same_layout(self.specs):
            raise cfg.error("variant", "clip4clip needs layers in one token layout (a transformer)")
        input_spec = None if self.grid_form else reads_embeddings(backbone, self.specs)
        self.reads_input = input_spec is not None
        sources = ([input_spec] if input_spec else []) + self.specs
        if cfg.variant == "clip4clip":
            self.down = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(s.width, d)) for s in sources)
            self.anchor_down = nn.Sequential(nn.ReLU(), nn.Linear(deepest, d))
            self.gate = _confidence_gate(d)
            self.up = nn.Sequential(nn.ReLU(), nn.Linear(d, deepest))
            self.out = nn.Identity() if self.out_width == deepest else nn.Linear(deepest, self.out_width)
            self.last_token = cfg.class_token == "last" or (cfg.class_token == "auto" and is_causal(backbone))
        elif self.grid_form:
            self.down = nn.ModuleList(nn.Sequential(nn.Linear(s.width, d), TokenBatchNorm(d)) for s in sources)
            # stages already on the anchor's grid have nothing to pool (see the module docstring)
            self.identity = nn.ModuleDict({str(i): nn.Sequential(nn.Linear(deepest, s.width), nn.ReLU())
                                           for i, s in enumerate(self.specs[:-1]) if s.grid != self.specs[-1].grid})
            self.fusion = _Fusion(d, self.out_width, TokenBatchNorm)
        else:
            self.down = nn.ModuleList(nn.Sequential(nn.Linear(s.width, d), nn.LayerNorm(d)) for s in sources)
            self.fusion = _Fusion(d, self.out_width, nn.LayerNorm)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None, embeddings: Tensor | None = None) -> SideOutput:
        self._check_inputs(feats, embeddings)
        feats = feats[: len(self.specs)]
        sources = ([embeddings] if self.reads_input else []) + list(feats)
        if self.cfg.variant == "clip4clip":
            return self._clip4clip(sources, mask)
        if self.grid_form:
            return self._grid(feats)
        projected = [down(b) for down, b in zip(self.down, sources)]
        tokens = self.fusion(projected[-1], projected[:-1], mask)
        return SideOutput(layers=projected[-len(self.specs):], tokens=tokens)

    # -- CNN stages (adapter_for_cnn.py) --------------------------------------------------------
    def anchor_pool(self, index: int, b: Tensor, anchor: Tensor) -> Tensor:
        """Anchor-guided pooling of stage `index` onto the anchor grid: `B x N_L x C_l`."""
        spec, last = self.specs[index], self.specs[-1]
        (h, w), (gh, gw) = spec.grid_for(b.shape[1]), last.grid_for(anchor.shape[1])
        rh, rw = max(1, round(h / gh)), max(1, round(w / gw))
        if str(index) not in self.identity:
            return b if (h, w) == (gh, gw) else resample_tokens(b, spec, last, anchor.shape[1])
        fmap = b.transpose(1, 2).reshape(b.shape[0], b.shape[2], h, w)
        if (h, w) != (gh * rh, gw * rw):
            fmap = F.interpolate(fmap, size=(gh * rh, gw * rw), mode="bilinear", align_corners=False)
        patches = fmap.reshape(b.shape[0], b.shape[2], gh, rh, gw, rw)
        guide = self.identity[str(index)](anchor).transpose(1, 2).reshape(b.shape[0], b.shape[2], gh, 1, gw, 1)
        score = torch.relu((guide * patches).sum(dim=1, keepdim=True))
        weights = l1norm(score, dim=(3, 5)) + 1.0 / (rh * rw)
        return (weights * patches).sum(dim=(3, 5)).flatten(2).transpose(1, 2)

    def _grid(self, feats: list[Tensor]) -> SideOutput:
        anchor_raw, last = feats[-1], self.specs[-1]
        targets = [self.down[i](self.anchor_pool(i, b, anchor_raw)) for i, b in enumerate(feats[:-1])]
        anchor = self.down[-1](anchor_raw)
        tokens = self.fusion(anchor, targets, None)
        # t_l stays on the anchor grid: the distillation's affine phi runs there and is then upsampled
        # to b_l's grid (exact: resampling commutes with token-wise affine maps), 1/(r_h r_w) the cost
        lifts = [partial(resample_tokens, src=last, dst=spec, n_dst=b.shape[1]) for spec, b in zip(self.specs, feats[:-1])]
        return SideOutput(layers=[*targets, anchor], tokens=tokens, lifts=[*lifts, None])

    # -- CLIP4Clip (module_adapter.py) ------------------------------------------------------------
    def class_index(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """Per sample, the position of the class token (prefix token, first, or last valid)."""
        n = tokens.shape[0]
        if self.last_token and not self.specs[-1].prefix and mask is not None and mask.shape[1] == tokens.shape[1]:
            return (mask.long().sum(dim=1) - 1).clamp_min(0)
        return torch.zeros(n, dtype=torch.long, device=tokens.device)

    def _clip4clip(self, sources: list[Tensor], mask: Tensor | None) -> SideOutput:
        rows = torch.arange(sources[-1].shape[0], device=sources[-1].device)
        index = self.class_index(sources[-1], mask)
        raw = sources[-1][rows, index].unsqueeze(1)  # B x 1 x D_L
        anchor = self.anchor_down(raw)
        projected = [down(b) for down, b in zip(self.down, sources)]
        merged, confidence = [], []
        for t in projected:
            t_mask = mask_for(mask, t.shape[1])
            gathered = cross_gather(anchor, t, t_mask)
            # + the class token of t_l: only a layer in b_L's token layout has one at b_L's class position
            merged.append(gathered + t[rows, index].unsqueeze(1) if t.shape[1] == sources[-1].shape[1] else gathered)
            confidence.append(self.gate(anchor[:, 0] * masked_mean(t, t_mask)))
        weights = torch.softmax(torch.cat(confidence, dim=1), dim=1)
        fused = torch.einsum("bl,blnd->bnd", weights, torch.stack(merged, dim=1))
        tokens = self.out(raw + self.up(fused))
        return SideOutput(layers=projected[-len(self.specs):], tokens=tokens)
