"""LST (Ladder Side-Tuning, NeurIPS 2022): a ladder of small transformer blocks beside the backbone.

Follows ylsung/Ladder-Side-Tuning `seq2seq/third_party/models/t5/modeling_side_t5.py` (`T5Stack`
with `side_block`, `side_first_downsample`, `side_downsamples`, learnable gates, `add_residual_after`
false, and the pruned initialisation of `seq2seq/pruning/pruning_methods.py`):
- the ladder starts from the embeddings: h = down_0(b_0), b_0 = the input of the first block;
- for every layer l picked by `layers` (official `encoder_side_layers`; None = all):
  h = g_l h + (1 - g_l) down_l(b_l), g_l = sigmoid(alpha_l / T), alpha_l = 0 (g = 0.5 at start), then
  h = side_block_l(h) (pre-LN self-attention + MLP at width d = D // r);
- a dropped layer loses both its block and its connection: no down_l, no gate, nothing happens;
- the output is LN(h) -> Linear(d -> out_width) (official `final_side_layer_norm` + `side_final_upsample`);
- side blocks start from the backbone blocks by structured pruning (`init_from_backbone`, default
  on, as in the official scripts): per selected layer, the rows/columns with the largest L1 norm of a
  compatible transformer block (open_clip, timm ViT, HF BERT / CLIP / ViT layers); LayerNorms are
  copied only from pre-LN blocks. Anything else keeps the random init, with a log line.

Deviations (named): the pruning criterion is the weight magnitude (the official code's data-free
option, `load_side_pretrained_weights: t5-base-v2`); the official scripts use `fisher-v2`, which needs
task gradients before the side network exists. Side blocks are pre-LN GELU blocks, not T5 blocks
(RMSNorm, relative position bias). Where the backbone exposes no embeddings (CNN stems: their
input is a map of another grid) the first layer stands in for them: h = down_0(b_1). When a layer's
token layout differs from h's (CNN stages), h is first resampled to it (`resample_tokens`), and grid
layers with more than `max_tokens` tokens run the ladder on an average-pooled grid.
s_l (what MDPD distils into b_l) is the ladder state after layer l (carried over a dropped layer),
resampled to b_l's layout; all s_l have the ladder width d.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.side.base import SideNetwork, SideOutput, reads_embeddings
from mdpd_vl.side.config import LSTConfig

log = logging.getLogger(__name__)


# -- token layout helpers (shared with the other side networks) ---------------------------------
def mask_for(mask: Tensor | None, num_tokens: int) -> Tensor | None:
    """The padding mask if it describes `num_tokens` tokens, else None (image layers)."""
    return mask if mask is not None and mask.shape[1] == num_tokens else None


def resample_tokens(x: Tensor, src: LayerSpec, dst: LayerSpec, n_dst: int) -> Tensor:
    """Move `B x N x D` tokens from layer layout `src` to `dst` with `n_dst` tokens.

    Grid tokens are average-pooled (or bilinearly upsampled) over the grid; prefix tokens are
    kept (or, when the prefix count changes, replaced by the mean of the source prefix/grid).
    Layouts without a grid are resampled along the sequence axis.
    """
    n_src = x.shape[1]
    if n_src == n_dst and src.prefix == dst.prefix:
        return x
    if src.grid is None or dst.grid is None:
        seq = x.transpose(1, 2)
        if n_dst <= n_src:
            seq = F.adaptive_avg_pool1d(seq, n_dst)
        else:
            seq = F.interpolate(seq, size=n_dst, mode="linear", align_corners=False)
        return seq.transpose(1, 2)
    (sh, sw), (dh, dw) = src.grid_for(n_src), dst.grid_for(n_dst)
    prefix, grid = x[:, : src.prefix], x[:, src.prefix :]
    fmap = grid.transpose(1, 2).reshape(x.shape[0], x.shape[2], sh, sw)
    if dh <= sh and dw <= sw:
        fmap = F.adaptive_avg_pool2d(fmap, (dh, dw))
    else:
        fmap = F.interpolate(fmap, size=(dh, dw), mode="bilinear", align_corners=False)
    grid = fmap.flatten(2).transpose(1, 2)
    if dst.prefix == 0:
        return grid
    if src.prefix != dst.prefix:
        source = prefix if src.prefix else grid
        prefix = source.mean(dim=1, keepdim=True).expand(-1, dst.prefix, -1)
    return torch.cat([prefix, grid], dim=1)


def coarse_tokens(spec: LayerSpec) -> int:
    """Token count of a layout with a grid: prefix + h * w."""
    assert spec.grid is not None
    return spec.prefix + spec.grid[0] * spec.grid[1]


def auto_heads(width: int, preferred: int | None = None) -> int:
    """`preferred` if it divides `width`, else the largest divisor of `width` not above width // 64."""
    if preferred is not None and preferred >= 1 and width % preferred == 0:
        return preferred
    cap = max(1, width // 64)
    return max(h for h in range(1, cap + 1) if width % h == 0)


class SideBlock(nn.Module):
    """A small pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)); padding-aware."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if width % heads:
            raise ValueError(f"{heads} heads do not divide the side width {width}")
        self.heads = heads
        hidden = max(1, round(width * mlp_ratio))
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            # a sample with no valid token would give NaN rows: let it attend everywhere instead
            valid = mask.bool() | ~mask.bool().any(dim=1, keepdim=True)
            attn_mask = valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


# -- init by structured pruning ----------------------------------------------------------------
def _lin(module: nn.Module) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a Linear; a missing bias reads as zeros."""
    w = module.weight
    b = module.bias if module.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return w, b


def _norm(module: nn.Module | None) -> tuple[Tensor, Tensor] | None:
    if module is None or getattr(module, "weight", None) is None or module.weight.dim() != 1:
        return None
    bias = module.bias if module.bias is not None else torch.zeros_like(module.weight)
    return module.weight, bias


def transformer_weights(block: nn.Module) -> dict[str, Any] | None:
    """q/k/v/o/fc1/fc2 (weight, bias), pre-LN norms and head count of a known transformer block."""
    attn = getattr(block, "attn", None)
    mlp = getattr(block, "mlp", None)
    if isinstance(attn, nn.MultiheadAttention) and hasattr(mlp, "c_fc"):  # open_clip
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            return None
        w = attn.in_proj_weight
        b = attn.in_proj_bias if attn.in_proj_bias is not None else torch.zeros(w.shape[0], device=w.device)
        (qw, kw, vw), (qb, kb, vb) = w.chunk(3), b.chunk(3)
        return dict(q=(qw, qb), k=(kw, kb), v=(vw, vb), o=_lin(attn.out_proj), fc1=_lin(mlp.c_fc),
                    fc2=_lin(mlp.c_proj), ln1=_norm(getattr(block, "ln_1", None)),
                    ln2=_norm(getattr(block, "ln_2", None)), heads=attn.num_heads)
    if hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(mlp, "fc1"):  # timm ViT block
        qkv_w, qkv_b = _lin(attn.qkv)
        (qw, kw, vw), (qb, kb, vb) = qkv_w.chunk(3), qkv_b.chunk(3)
        return dict(q=(qw, qb), k=(kw, kb), v=(vw, vb), o=_lin(attn.proj), fc1=_lin(mlp.fc1),
                    fc2=_lin(mlp.fc2), ln1=_norm(getattr(block, "norm1", None)),
                    ln2=_norm(getattr(block, "norm2", None)), heads=attn.num_heads)
    self_attn = getattr(getattr(block, "attention", None), "self", None)
    if self_attn is not None and hasattr(block, "intermediate"):  # HF BERT-like (post-LN)
        return dict(q=_lin(self_attn.query), k=_lin(self_attn.key), v=_lin(self_attn.value),
                    o=_lin(block.attention.output.dense), fc1=_lin(block.intermediate.dense),
                    fc2=_lin(block.output.dense), ln1=None, ln2=None,
                    heads=self_attn.num_attention_heads)
    self_attn = getattr(block, "self_attn", None) or getattr(block, "attention", None)
    if hasattr(self_attn, "q_proj") and hasattr(mlp, "fc1"):  # HF CLIP / ViT (5.x) layers (pre-LN)
        out = getattr(self_attn, "out_proj", None) or getattr(self_attn, "o_proj", None)
        heads = getattr(self_attn, "num_heads", None) or getattr(self_attn, "num_attention_heads", None)
        if out is None or heads is None:
            return None
        ln1 = getattr(block, "layer_norm1", None) or getattr(block, "layernorm_before", None)
        ln2 = getattr(block, "layer_norm2", None) or getattr(block, "layernorm_after", None)
        return dict(q=_lin(self_attn.q_proj), k=_lin(self_attn.k_proj), v=_lin(self_attn.v_proj),
                    o=_lin(out), fc1=_lin(mlp.fc1), fc2=_lin(mlp.fc2), ln1=_norm(ln1), ln2=_norm(ln2),
                    heads=int(heads))
    return None


def _top(score: Tensor, n: int) -> Tensor:
    return torch.topk(score, n).indices.sort().values


def _keep_heads(score: Tensor, n: int, heads_b: int, heads_s: int) -> Tensor:
    """Top-`n` inner attention dims; per head (so heads stay whole) when the head counts match."""
    if heads_b != heads_s or n % heads_b or score.numel() % heads_b:
        return _top(score, n)
    size, per = score.numel() // heads_b, n // heads_b
    return torch.cat([h * size + _top(score[h * size : (h + 1) * size], per) for h in range(heads_b)])


@torch.no_grad()
def prune_into(side: SideBlock, w: dict[str, Any]) -> bool:
    """Copy the largest-L1 rows/columns of backbone block weights `w` into `side`; False if too small."""
    qw, kw, vw, ow = w["q"][0], w["k"][0], w["v"][0], w["o"][0]
    f1w, f2w = w["fc1"][0], w["fc2"][0]
    width, hidden = side.proj.in_features, side.fc1.out_features
    if qw.shape[0] != qw.shape[1] or width > qw.shape[1] or hidden > f1w.shape[0]:
        return False
    # residual dims: how much every input / output matrix of the block uses them
    res = _top(qw.abs().sum(0) + kw.abs().sum(0) + vw.abs().sum(0) + f1w.abs().sum(0)
               + ow.abs().sum(1) + f2w.abs().sum(1), width)
    qk = _keep_heads(qw.abs().sum(1) + kw.abs().sum(1), width, w["heads"], side.heads)
    vo = _keep_heads(vw.abs().sum(1) + ow.abs().sum(0), width, w["heads"], side.heads)
    mid = _top(f1w.abs().sum(1) + f2w.abs().sum(0), hidden)
    dev = side.qkv.weight
    rows = [(w["q"], qk), (w["k"], qk), (w["v"], vo)]
    side.qkv.weight.copy_(torch.cat([m[0][i][:, res] for m, i in rows]).to(dev))
    side.qkv.bias.copy_(torch.cat([m[1][i] for m, i in rows]).to(dev))
    side.proj.weight.copy_(ow[res][:, vo].to(dev))
    side.proj.bias.copy_(w["o"][1][res].to(dev))
    side.fc1.weight.copy_(f1w[mid][:, res].to(dev))
    side.fc1.bias.copy_(w["fc1"][1][mid].to(dev))
    side.fc2.weight.copy_(f2w[res][:, mid].to(dev))
    side.fc2.bias.copy_(w["fc2"][1][res].to(dev))
    for name, norm in (("ln1", side.norm1), ("ln2", side.norm2)):
        if w[name] is not None and w[name][0].numel() == qw.shape[1]:
            norm.weight.copy_(w[name][0][res].to(dev))
            norm.bias.copy_(w[name][1][res].to(dev))
    return True


# -- the network ----------------------------------------------------------------------------------
class LST(SideNetwork):
    """Ladder side network; see the module docstring for the layout choices."""

    def __init__(self, specs: list[LayerSpec], cfg: LSTConfig | None = None, backbone: Backbone | None = None):
        super().__init__(specs)
        cfg = cfg if cfg is not None else LSTConfig()
        cfg.validate(self.specs)
        self.cfg = cfg
        n = len(self.specs)
        width = cfg.side_width(self.specs)
        self.selected = cfg.selected(n)
        weights = self._backbone_weights(backbone) if cfg.init_from_backbone else {}
        first = next(iter(weights.values()), None)
        heads = cfg.heads or auto_heads(width, first["heads"] if first else None)
        input_spec = reads_embeddings(backbone, self.specs)
        self.reads_input = input_spec is not None
        self.input_layout = input_spec or self.specs[0]
        self.first_down = nn.Linear(self.input_layout.width, width)
        self.down = nn.ModuleDict({str(i): nn.Linear(self.specs[i].width, width) for i in self.selected})
        self.alpha = nn.Parameter(torch.zeros(len(self.selected)))  # one gate per selected layer
        self.blocks = nn.ModuleDict({str(i): SideBlock(width, heads, cfg.mlp_ratio) for i in self.selected})
        self.norm = nn.LayerNorm(width)
        self.out_width = cfg.output_width(self.specs)
        self.head = nn.Linear(width, self.out_width)
        self.layer_widths = [width] * n
        if cfg.init_from_backbone:
            self._prune_init(weights)

    def gates(self) -> Tensor:
        """g_l = sigmoid(alpha_l / T) for the selected layers, in order (0.5 at initialisation)."""
        return torch.sigmoid(self.alpha / self.cfg.gate_temperature)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None, embeddings: Tensor | None = None) -> SideOutput:
        self._check_inputs(feats, embeddings)
        feats = feats[: len(self.specs)]
        gates = self.gates()
        start = embeddings if self.reads_input else feats[0]
        prev = self._coarse(self.input_layout, start.shape[1])
        h = self.first_down(self._pool(start, self.input_layout, prev))
        layers: list[Tensor] = []
        lifts: list[Callable[[Tensor], Tensor] | None] = []
        for i, (b, spec) in enumerate(zip(feats, self.specs)):
            coarse = self._coarse(spec, b.shape[1])
            if str(i) in self.blocks:
                h = resample_tokens(h, prev, coarse, coarse_tokens(coarse) if coarse.grid else b.shape[1])
                g = gates[self.selected.index(i)]
                h = g * h + (1 - g) * self.down[str(i)](self._pool(b, spec, coarse))
                h = self.blocks[str(i)](h, mask_for(mask, h.shape[1]))
                prev = coarse
            # s_l stays on the ladder's layout; the distillation lifts it after its affine phi (exact)
            layers.append(h)
            lifts.append(None if h.shape[1] == b.shape[1] and prev.prefix == spec.prefix
                         else partial(resample_tokens, src=prev, dst=spec, n_dst=b.shape[1]))
        return SideOutput(layers=layers, tokens=self.head(self.norm(h)), lifts=lifts)

    def _pool(self, b: Tensor, spec: LayerSpec, coarse: LayerSpec) -> Tensor:
        return b if coarse is spec else resample_tokens(b, spec, coarse, coarse_tokens(coarse))

    def _coarse(self, spec: LayerSpec, n: int) -> LayerSpec:
        """The layout the ladder uses for a layer: its own, or a pooled grid of <= max_tokens tokens."""
        grid = spec.grid_for(n)
        if grid is None or grid[0] * grid[1] <= self.cfg.max_tokens:
            return spec if grid == spec.grid else LayerSpec(spec.width, grid, spec.prefix)
        f = math.ceil(math.sqrt(grid[0] * grid[1] / self.cfg.max_tokens))
        return LayerSpec(spec.width, (max(1, grid[0] // f), max(1, grid[1] // f)), spec.prefix)

    # -- init from the backbone -------------------------------------------------------------------
    def _backbone_weights(self, backbone: Backbone | None) -> dict[int, dict[str, Any]]:
        """Weights of the backbone blocks behind the selected layers ({} when not usable)."""
        if backbone is None:
            log.warning("LST: init_from_backbone is set but no backbone was given: random init")
            return {}
        blocks = list(backbone.blocks)
        if len(blocks) != len(self.specs):
            log.warning("LST: the backbone has %d blocks for %d layers: random init", len(blocks), len(self.specs))
            return {}
        found = {i: transformer_weights(blocks[i]) for i in self.selected}
        missing = [i for i, w in found.items() if w is None]
        if missing:
            log.warning("LST: backbone blocks %s (%s) are not transformer blocks we can prune: random init "
                        "for them", missing, type(blocks[missing[0]]).__name__)
        return {i: w for i, w in found.items() if w is not None}

    def _prune_init(self, weights: dict[int, dict[str, Any]]) -> None:
        done = [i for i, w in weights.items() if prune_into(self.blocks[str(i)], w)]
        narrow = sorted(set(weights) - set(done))
        if narrow:
            log.warning("LST: backbone blocks %s are narrower than the side blocks: random init for them", narrow)
        if done:
            log.info("LST: side blocks %s initialised by L1 structured pruning of the backbone", done)

__all__ = ["LST", "SideBlock", "auto_heads", "mask_for", "prune_into", "resample_tokens", "transformer_weights"]
