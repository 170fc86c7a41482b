"""SHERL (ECCV 2024): redundancy-aware early fusion, then the late route through the frozen last block.

Follows Paranioar/SHERL `VSE-infty/lib/adapter_for_transformer.py` (`sherl_for_transformer`),
`adapter_for_cnn.py` (`sherl_for_resnet`) and their use in `encoders.py` / `modules/resnet.py`:

- The backbone runs up to the input h of its last k blocks (`late_blocks`, official 1): transformers
  read b_0 (the embeddings, when exposed) .. b_{L-k} and h = b_{L-k}; CNN hosts read the stages
  before the deepest one and h is the input of the last k units (bottlenecks) of the deepest stage,
  which the side network computes by running that stage's earlier units itself.
- Early route: every source is projected to width d (transformers: Linear + LN; CNN: max + average
  pooling onto h's grid, then conv1x1 + BN). The projected h (or, when h is itself a layer, the
  deepest source) guides: per token, layer i gets relu(w . (f_i * g)) / red_i with
  red_i = sum_j relu(cos(f_i, f_j)) over the other sources, L1-normalised over layers;
  fused = g + sum_i w_i f_i.
- Late route: x = fc_out(fused) + tanh(alpha / T) * h, alpha = 0 at start (transformers:
  fc_out = ReLU -> Linear(d -> D_h) -> LN -> Dropout(0.1); CNN: conv1x1 -> BN -> ReLU), then x ALWAYS
  goes through the frozen last block(s): at initialisation the frozen block sees only the side
  output, and gradients reach fc_out through it. CNN hosts re-run only those last units, plus any
  module between them and the deepest layer (EfficientNet's conv_head), found by a probe.
  The re-run modules are never registered here; they run with detached parameters and copied
  buffers (`side.blocks.BlockRunner`), so no backbone tensor gets a gradient or changes.
- Served alone (`SideKeptModel`), the backbone stops at h (`reads_layers`), so SHERL costs the
  official L block runs, not L + k.

Layers without a grid may differ in token count (MDETR as a backbone: encoder memory, image + text tokens,
then decoder queries). The official per-token fusion needs one count: a source with another one is gathered
onto the guide's tokens by UniPT's parameter-free cross-attention, l1norm(relu(g t^T)) t (padding masked),
before the fusion. The official MDETR file (Paranioar/SHERL `MDETR/models/transformer.py`) instead runs one
SHERL block per tower (encoder layers into the encoder output, decoder layers into the decoder's last
layer, which then cross-attends to the side memory); the backbone protocol gives one list of layers, so here
the memory layers reach the query guide through that gather. Layers of the guide's count (every layer of an
ordinary transformer) are fused exactly as above.

s_l (what MDPD distils into b_l) is the projected source for the layers SHERL reads (resampled back
to b_l's grid on CNNs) and the re-run blocks' outputs for the layers above h.

Fallback, named in a log line: without a backbone, or when the probe cannot reproduce b_L by
re-running, the frozen blocks are replaced by a trainable transformer block at h's width.
Deviation: `out_width` other than the deepest width adds a Linear after the late route (the official
output width is the backbone's, fed to VSE-infinity's own head).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.side.base import SideNetwork, SideOutput, reads_embeddings
from mdpd_vl.side.blocks import BlockRunner, block_family, call_order, modules_between
from mdpd_vl.side.config import SHERLConfig
from mdpd_vl.side.lst import SideBlock, auto_heads, mask_for, resample_tokens
from mdpd_vl.side.unipt import TokenBatchNorm, gather_onto, l1norm, same_layout

log = logging.getLogger(__name__)

__all__ = ["SHERL", "BlockRunner", "LateRoute", "block_family", "plan_late_route"]


@dataclass
class LateRoute:
    """How SHERL reaches the frozen last blocks of one backbone (see `plan_late_route`)."""

    read: int  # the side network reads b_1..b_read
    pre: BlockRunner | None  # frozen units run on b_read to give h (CNN); None: h = b_read
    late: BlockRunner  # frozen modules re-run on fc_out(fused) + gate * h
    marks: dict[int, int]  # position in `late` -> index of the layer whose output it gives
    h_spec: LayerSpec  # layout of h


def _units(stage: nn.Module) -> list[nn.Module] | None:
    return list(stage) if isinstance(stage, nn.Sequential) and len(stage) > 0 else None


@torch.no_grad()
def plan_late_route(backbone: Backbone, specs: list[LayerSpec], k: int) -> LateRoute:
    """The late route over `backbone`'s last k blocks (transformers) or units (CNN), checked by a probe
    that must reproduce the backbone's own layers; raises ValueError when it cannot."""
    blocks, n = list(backbone.blocks), len(specs)
    if len(blocks) != n:
        raise ValueError(f"the backbone has {len(blocks)} blocks for {n} layers")
    was = backbone.training
    backbone.eval()
    try:
        x = backbone.example_input(2)
        feats = backbone.features(x)
        if same_layout(specs):
            read, pre = n - k, None
            late = BlockRunner(blocks[read:], specs[read - 1], backbone)
            marks = {i: read + i for i in range(k)}
            h_spec = specs[read - 1]
        else:
            stage = next((i for i in reversed(range(1, n)) if len(_units(blocks[i]) or []) >= k), None)
            if stage is None:
                raise ValueError(f"no CNN stage after the first has {k} unit(s) to re-run")
            units = _units(blocks[stage]) or []
            read = stage
            pre = BlockRunner(units[:-k], specs[read - 1], backbone) if len(units) > k else None
            modules, marks = list(units[-k:]), {}
            marks[len(modules) - 1] = stage
            events = call_order(backbone, lambda: backbone.features(x))
            for layer in range(stage + 1, n):
                modules += [*modules_between(events, blocks[layer - 1], blocks[layer]), blocks[layer]]
                marks[len(modules) - 1] = layer
            h0 = pre(feats[read - 1], None) if pre is not None else feats[read - 1]
            grid = specs[stage].grid if pre is not None else specs[read - 1].grid
            h_spec = LayerSpec(int(h0.shape[-1]), grid, 0)
            late = BlockRunner(modules, h_spec, backbone, marks=marks)
        h = pre(feats[read - 1], None) if pre is not None else feats[read - 1]
        mask = backbone.padding_mask(x)
        outs = late.run(h, mask)
        for (pos, layer), out in zip(sorted(marks.items()), outs):
            want = feats[layer]
            valid = mask[..., None] if mask is not None and mask.shape[1] == want.shape[1] else 1
            if out.shape != want.shape or not torch.allclose(out * valid, want * valid, atol=1e-4, rtol=1e-3):
                raise ValueError(f"re-running does not reproduce layer {layer} (module {pos})")
    finally:
        backbone.train(was)
    return LateRoute(read, pre, late, marks, h_spec)


class _PoolProject(nn.Module):
    """CNN source -> h's grid (max + average pooling, official `Downsample`) -> conv1x1 + BN."""

    def __init__(self, width: int, d: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(width, d), TokenBatchNorm(d))

    def forward(self, x: Tensor, spec: LayerSpec, target: LayerSpec, n_target: int) -> Tensor:
        (h, w), size = spec.grid_for(x.shape[1]), target.grid_for(n_target)
        fmap = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        if (h, w) != size:
            fmap = F.adaptive_max_pool2d(fmap, size) + F.adaptive_avg_pool2d(fmap, size)
        else:
            fmap = fmap + fmap  # max + average pooling of a 1x1 window, as the official rate-1 layer does
        return self.proj(fmap.flatten(2).transpose(1, 2))


class SHERL(SideNetwork):
    """SHERL side network; see the module docstring."""

    def __init__(self, specs: list[LayerSpec], cfg: SHERLConfig | None = None, backbone: Backbone | None = None):
        super().__init__(specs)
        cfg = cfg if cfg is not None else SHERLConfig()
        cfg.validate(self.specs)
        self.cfg = cfg
        d, k = cfg.side_width(self.specs), cfg.late_blocks
        self.tokens_form = same_layout(self.specs)
        self._route: list[LateRoute] = []  # a plain list: the backbone modules are not ours to register
        reason = "no backbone was given"
        if backbone is not None:
            try:
                self._route = [plan_late_route(backbone, self.specs, k)]
            except Exception as err:  # any failure to re-run means: use the trainable fallback
                reason = f"its last {k} block(s) cannot be re-run standalone ({type(err).__name__}: {err})"
        route = self._route[0] if self._route else None
        self.reads_layers = route.read if route else len(self.specs) - 1
        self.h_spec = route.h_spec if route else self.specs[self.reads_layers - 1]
        self.has_pre = route is not None and route.pre is not None
        input_spec = reads_embeddings(backbone, self.specs) if self.tokens_form else None
        self.reads_input = input_spec is not None
        self.source_specs = ([input_spec] if input_spec else []) + self.specs[: self.reads_layers]
        projected = self.source_specs + ([self.h_spec] if self.has_pre else [])
        width_h = self.h_spec.width
        if self.tokens_form:
            self.hor = nn.ModuleList(nn.Sequential(nn.Linear(s.width, d), nn.LayerNorm(d)) for s in projected)
            self.fc_out = nn.Sequential(nn.ReLU(), nn.Linear(d, width_h), nn.LayerNorm(width_h, eps=1e-12),
                                        nn.Dropout(0.1))
        else:
            self.hor = nn.ModuleList(_PoolProject(s.width, d) for s in projected)
            self.fc_out = nn.Sequential(nn.Linear(d, width_h), TokenBatchNorm(width_h), nn.ReLU())
        self.guide = nn.Linear(d, 1)
        self.alpha = nn.Parameter(torch.zeros(1))
        deepest = self.specs[-1].width
        self.out_width = cfg.output_width(self.specs)
        self.out = nn.Identity() if self.out_width == deepest else nn.Linear(deepest, self.out_width)
        self.fallback: nn.Module | None = None
        self.fallback_out: nn.Module | None = None
        if route is None:
            log.warning("SHERL: late route falls back to a trainable transformer block at width %d: %s",
                        width_h, reason)
            self.fallback = SideBlock(width_h, auto_heads(width_h))
            self.fallback_out = nn.Linear(width_h, deepest)
        else:
            log.info("SHERL: late route through the backbone's last %d frozen block(s)/unit(s)", k)
        self.layer_widths = [d] * self.reads_layers + [s.width for s in self.specs[self.reads_layers:]]

    @property
    def uses_backbone_blocks(self) -> bool:
        """True when the late route re-runs frozen backbone modules (False: trainable fallback)."""
        return bool(self._route)

    @property
    def rerun_modules(self) -> int:
        """How many frozen backbone modules (blocks / units, + modules between) the side re-runs."""
        if not self._route:
            return 0
        route = self._route[0]
        return len(route.late.blocks) + (len(route.pre.blocks) if route.pre is not None else 0)

    def gate(self) -> Tensor:
        """tanh(alpha / T): 0 at initialisation, so h is not added and x = fc_out(fused)."""
        return torch.tanh(self.alpha / self.cfg.gate_temperature)

    def fuse(self, guide: Tensor, shallow: list[Tensor], mask: Tensor | None = None) -> Tensor:
        """Redundancy-aware fusion of the shallower sources into the guide. Sources of the guide's token
        count are fused token by token; a source with another count (no grid: MDETR's memory beside its
        queries) is first gathered onto the guide's tokens (`unipt.gather_onto`; `mask` is its padding)."""
        if not shallow:
            return guide
        shallow = [gather_onto(guide, s, mask_for(mask, s.shape[1]), identity=False) for s in shallow]
        stack = torch.stack(shallow, dim=2)  # B x N x S x d
        unit = F.normalize(stack, dim=-1)
        redundancy = torch.relu(unit @ unit.transpose(-1, -2)).sum(-1, keepdim=True)
        score = torch.relu(self.guide(stack * guide.unsqueeze(2))) / redundancy.clamp_min(1e-6)
        return guide + (l1norm(score, dim=2) * stack).sum(dim=2)

    def _project(self, i: int, x: Tensor, spec: LayerSpec, n_h: int) -> Tensor:
        if self.tokens_form:
            return self.hor[i](x)
        return self.hor[i](x, spec, self.h_spec, n_h)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None, embeddings: Tensor | None = None) -> SideOutput:
        self._check_inputs(feats, embeddings)
        read = list(feats[: self.reads_layers])
        sources = ([embeddings] if self.reads_input else []) + read
        route = self._route[0] if self._route else None
        if route is not None and route.pre is not None:
            with torch.no_grad():  # frozen units on detached features: nothing to backpropagate
                h = route.pre(read[-1], mask)
        else:
            h = read[-1]
        n_h = h.shape[1]
        projected = [self._project(i, x, s, n_h) for i, (x, s) in enumerate(zip(sources, self.source_specs))]
        if self.has_pre:
            guide, shallow = self._project(len(sources), h, self.h_spec, n_h), projected
        else:
            guide, shallow = projected[-1], projected[:-1]
        x = self.fc_out(self.fuse(guide, shallow, mask)) + self.gate() * h
        late = self._late(x, mask, feats)
        offset = len(sources) - len(read)
        layers = [p if self.tokens_form else resample_tokens(p, self.h_spec, s, b.shape[1])
                  for p, s, b in zip(projected[offset:], self.specs, read)]
        return SideOutput(layers=layers + late, tokens=self.out(late[-1]))

    def _late(self, x: Tensor, mask: Tensor | None, feats: list[Tensor]) -> list[Tensor]:
        """The outputs of the layers above h: re-run frozen modules (or the trainable fallback)."""
        if self._route:
            return self._route[0].late.run(x, mask)
        assert self.fallback is not None and self.fallback_out is not None
        y = self.fallback(x, mask_for(mask, x.shape[1]))
        last = self.specs[-1]
        if len(feats) == len(self.specs):  # b_L's token count at this input size (MDPD passes every layer)
            n_last = feats[-1].shape[1]
        else:
            n_last = last.prefix + last.grid[0] * last.grid[1] if last.grid else y.shape[1]
        return [self.fallback_out(resample_tokens(y, self.h_spec, last, n_last))]
