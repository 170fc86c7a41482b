"""SHERL (ECCV 2024): redundancy-aware early fusion, then a gated late route through frozen blocks.

Early route: s_l = LN(Linear(D_l -> D_l // r)(b_l)) (the side feature MDPD distils), t_l = map to
the fusion width d (identity when equal), resampled to the deepest layer's token layout. The
deepest layer guides: for every token, layer i < L gets weight relu(w . (t_i * t_L)) / red_i with
red_i = sum_j relu(cos(t_i, t_j)) over the shallower layers (a layer that repeats the others counts
less), L1-normalised over layers; fused = t_L + sum_i w_i t_i; early = LN(Linear(relu(fused))).

Late route: fused -> ReLU -> Linear(d -> width of layer L-k) -> LN, resampled to that layer's
layout, then re-run through the backbone's last k blocks (`late_blocks`). The blocks are never
registered here and run with detached parameters and copied buffers, so no backbone tensor gets a
gradient or changes while gradients still reach the side parameters through them.
tokens = early + tanh(alpha / T) * late, alpha = 0: the gate starts closed (tokens = early route).
Without a backbone, or when its blocks cannot be re-run standalone (`BlockRunner` knows open_clip
resblocks, transformers layers, conv stages and token blocks such as timm's ViT), the late route is
a small trainable transformer block at width d instead, and a log line says so.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.side.base import SideNetwork, SideOutput
from mdpd_vl.side.config import SHERLConfig
from mdpd_vl.side.lst import SideBlock, auto_heads, mask_for, resample_tokens

log = logging.getLogger(__name__)


class _Direct(nn.Module):
    """Calls the class `forward` of a block: skips instance hooks/patches (backbone feature hooks,
    activation checkpointing) so re-running a block never touches the backbone's state."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: object, **kwargs: object) -> object:
        return type(self.block).forward(self.block, *args, **kwargs)


def block_family(block: nn.Module) -> str:
    """Calling convention of a backbone block: 'open_clip', 'hf', 'map' (conv stage) or 'tokens'."""
    if isinstance(getattr(block, "attn", None), nn.MultiheadAttention) and hasattr(block, "ln_1"):
        return "open_clip"
    if type(block).__module__.startswith("transformers."):
        return "hf"
    if any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in block.modules()):
        return "map"
    return "tokens"


def _open_clip_causal(backbone: nn.Module, block: nn.Module) -> Tensor | None:
    """The causal mask of the open_clip text transformer that owns `block`, if any."""
    for module in backbone.modules():
        mask, tower = getattr(module, "attn_mask", None), getattr(module, "transformer", None)
        if isinstance(mask, Tensor) and any(b is block for b in getattr(tower, "resblocks", [])):
            return mask
    return None


def _hf_causal(block: nn.Module) -> bool:
    for module in block.modules():
        config = getattr(module, "config", None)
        if config is not None:
            return bool(getattr(config, "is_decoder", False)) or getattr(config, "model_type", "") == "clip_text_model"
    return False


def _causal_additive(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)


class BlockRunner:
    """Re-runs backbone blocks standalone on tokens `B x N x D` with their calling convention."""

    def __init__(self, blocks: list[nn.Module], in_spec: LayerSpec, backbone: nn.Module):
        self.blocks = [_Direct(b) for b in blocks]
        self.families = [block_family(b) for b in blocks]
        self.in_spec = in_spec
        flag = getattr(backbone, "causal", None)
        self.causal: list[Tensor | bool | None] = []
        for block, family in zip(blocks, self.families):
            if family == "open_clip":
                found = _open_clip_causal(backbone, block)
                self.causal.append(found if found is not None else (True if flag else None))
            else:
                self.causal.append(bool(flag) if flag is not None else family == "hf" and _hf_causal(block))

    def _call(self, direct: _Direct, *args: object, **kwargs: object) -> object:
        block = direct.block
        state = {f"block.{n}": p.detach() for n, p in block.named_parameters()}
        # copies, so a BatchNorm in train mode cannot update the backbone's running statistics
        state.update({f"block.{n}": b.clone() for n, b in block.named_buffers()})
        return functional_call(direct, state, args, kwargs)

    def __call__(self, x: Tensor, mask: Tensor | None) -> Tensor:
        for direct, family, causal in zip(self.blocks, self.families, self.causal):
            x = self._run(direct, family, causal, x, mask_for(mask, x.shape[1]))
        return x

    def _run(self, direct: _Direct, family: str, causal: Tensor | bool | None, x: Tensor,
             mask: Tensor | None) -> Tensor:
        n = x.shape[1]
        if family == "open_clip":
            batch_first = getattr(direct.block.attn, "batch_first", False)
            attn_mask = None
            if isinstance(causal, Tensor):
                attn_mask = causal[:n, :n].to(x.dtype)
            elif causal:
                attn_mask = _causal_additive(n, x.dtype, x.device)
            y = x if batch_first else x.transpose(0, 1)
            out = self._call(direct, y, attn_mask=attn_mask)
            assert isinstance(out, Tensor)
            return out if batch_first else out.transpose(0, 1)
        if family == "hf":
            add = None
            if mask is not None:
                add = (~mask.bool())[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
            if causal:
                causal_add = _causal_additive(n, x.dtype, x.device)[None, None]
                add = causal_add if add is None else torch.minimum(add, causal_add)  # min avoids -inf
            out = self._call(direct, x, attention_mask=add)
        elif family == "map":
            if self.in_spec.prefix:
                raise ValueError("a conv stage cannot take prefix tokens")
            h, w = self.in_spec.grid_for(n) or (n, 1)
            out = self._call(direct, x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w))
        else:
            out = self._call(direct, x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert isinstance(out, Tensor)
        return out.flatten(2).transpose(1, 2) if out.dim() == 4 else out


def make_runner(backbone: Backbone, k: int, specs: list[LayerSpec]) -> BlockRunner:
    """A runner over the backbone's last `k` blocks, probed once; raises if they cannot re-run."""
    blocks = list(backbone.blocks)
    if len(blocks) != len(specs):
        raise ValueError(f"the backbone has {len(blocks)} blocks for {len(specs)} layers")
    in_spec, out_spec = specs[-k - 1], specs[-1]
    runner = BlockRunner(blocks[-k:], in_spec, backbone)
    n_in = in_spec.prefix + in_spec.grid[0] * in_spec.grid[1] if in_spec.grid else 4
    n_out = out_spec.prefix + out_spec.grid[0] * out_spec.grid[1] if out_spec.grid else n_in
    param = next(iter(blocks[-1].parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        out = runner(torch.zeros(2, n_in, in_spec.width, device=device, dtype=dtype), None)
    if tuple(out.shape) != (2, n_out, out_spec.width):
        raise ValueError(f"re-running gives {tuple(out.shape)}, expected {(2, n_out, out_spec.width)}")
    return runner


class SHERL(SideNetwork):
    """SHERL side network; see the module docstring."""

    def __init__(self, specs: list[LayerSpec], cfg: SHERLConfig | None = None, backbone: Backbone | None = None):
        super().__init__(specs)
        cfg = cfg if cfg is not None else SHERLConfig()
        cfg.validate(self.specs)
        self.cfg = cfg
        d = cfg.side_width(self.specs)
        self.layer_widths = [s.width // cfg.r for s in self.specs]
        self.out_width = cfg.output_width(self.specs)
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(s.width, w), nn.LayerNorm(w)) for s, w in zip(self.specs, self.layer_widths)
        )
        self.to_d = nn.ModuleList(nn.Identity() if w == d else nn.Linear(w, d) for w in self.layer_widths)
        self.guide = nn.Linear(d, 1)
        self.early_out = nn.Sequential(nn.ReLU(), nn.Linear(d, self.out_width), nn.LayerNorm(self.out_width))
        self._runner: list[BlockRunner] = []  # a plain list: the backbone blocks are not ours to register
        self.late_in: nn.Module | None = None
        self.late_out: nn.Module | None = None
        self.alpha: nn.Parameter | None = None
        if cfg.late_blocks > 0:
            self._build_late(cfg.late_blocks, d, backbone)

    def _build_late(self, k: int, d: int, backbone: Backbone | None) -> None:
        self.alpha = nn.Parameter(torch.zeros(1))
        reason = "no backbone was given"
        if backbone is not None:
            try:
                self._runner = [make_runner(backbone, k, self.specs)]
            except Exception as err:  # any failure to re-run means: use the trainable fallback
                reason = f"its last {k} block(s) cannot be re-run standalone ({type(err).__name__}: {err})"
        if self._runner:
            width_in, deepest = self.specs[-k - 1].width, self.specs[-1].width
            self.late_in = nn.Sequential(nn.ReLU(), nn.Linear(d, width_in), nn.LayerNorm(width_in))
            self.late_out = nn.Identity() if deepest == self.out_width else nn.Linear(deepest, self.out_width)
            log.info("SHERL: late route through the last %d frozen backbone block(s)", k)
            return
        log.warning("SHERL: late route falls back to a trainable transformer block at width %d: %s", d, reason)
        self.late_in = SideBlock(d, auto_heads(d))
        self.late_out = nn.Linear(d, self.out_width)

    @property
    def uses_backbone_blocks(self) -> bool:
        """True when the late route re-runs frozen backbone blocks (False: trainable fallback)."""
        return bool(self._runner)

    def gate(self) -> Tensor | None:
        """tanh(alpha / T): 0 at initialisation (closed)."""
        return None if self.alpha is None else torch.tanh(self.alpha / self.cfg.gate_temperature)

    def fuse(self, targets: list[Tensor]) -> Tensor:
        """Redundancy-aware fusion of the shallower layers into the deepest one (same layout)."""
        guide = targets[-1]
        if len(targets) == 1:
            return guide
        shallow = torch.stack(targets[:-1], dim=2)  # B x N x (L-1) x d
        unit = F.normalize(shallow, dim=-1)
        redundancy = torch.relu(unit @ unit.transpose(-1, -2)).sum(-1, keepdim=True)
        score = torch.relu(self.guide(shallow * guide.unsqueeze(2))) / redundancy.clamp_min(1e-6)
        weights = score / score.sum(dim=2, keepdim=True).clamp_min(1e-6)
        return guide + (weights * shallow).sum(dim=2)

    def forward(self, feats: list[Tensor], mask: Tensor | None = None) -> SideOutput:
        if len(feats) != len(self.specs):
            raise ValueError(f"SHERL expects {len(self.specs)} layers, got {len(feats)}")
        side = [proj(b) for proj, b in zip(self.proj, feats)]
        last, n_last = self.specs[-1], feats[-1].shape[1]
        targets = [resample_tokens(to_d(s), spec, last, n_last) for to_d, s, spec in zip(self.to_d, side, self.specs)]
        fused = self.fuse(targets)
        tokens = self.early_out(fused)
        gate = self.gate()
        if gate is not None:
            tokens = tokens + gate * self.late(fused, feats, mask)
        return SideOutput(layers=side, tokens=tokens)

    def late(self, fused: Tensor, feats: list[Tensor], mask: Tensor | None) -> Tensor:
        """The late route on the fused feature (anchor layout), before the gate."""
        assert self.late_in is not None and self.late_out is not None
        if not self._runner:
            return self.late_out(self.late_in(fused, mask_for(mask, fused.shape[1])))
        k = self.cfg.late_blocks
        x = resample_tokens(self.late_in(fused), self.specs[-1], self.specs[-k - 1], feats[-k - 1].shape[1])
        return self.late_out(self._runner[0](x, mask))
