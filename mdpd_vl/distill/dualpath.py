"""DualPath: the MDPD core. Backbone and side network teach each other; `fade()` keeps the backbone.

One training step (`forward`):
1. the backbone runs ONCE: `b_1..b_L`. With `backbone_trainable: head` it runs under
   `torch.no_grad()`, so not a single backbone activation is saved for backward; with norm
   tuning the graph is kept (only blocks holding a trainable norm record anything);
2. detached copies of `b_l` feed the side network -> `s_1..s_L` -> side head -> y_S;
3. the backbone path y_B = W_B(GAP(b_L));
4. losses (weighted, so `sum(losses.values())` is the objective): 'task_side' (task loss on
   y_S), 'shallow' (phi(s_l) imitates b_l), 'deep' (G regenerates masked phi(s_l)), 'logits'
   (y_B learns from the detached y_S, or from an EMA copy of the side path) and optionally
   'task_backbone'.
Frozen-backbone mode (`backbone_mode`, set from `MethodConfig.backbone_mode`, the same for every
method): 'eval' (default) runs the frozen backbone in eval mode: BatchNorm running statistics never
drift and dropout does not perturb the teacher features (which also makes per-layer features
cacheable when only the head trains); 'bn_eval' keeps dropout as in training (the official
VSE-infinity / LST recipes) with BatchNorm still frozen.

Once per optimiser step (not per forward: a step may hold several micro-batches), see
`distill/steps.py`: the `alternate` phase advances and the EMA teacher is updated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.distill.bottleneck import Bottleneck
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.distill.generation import GenerationBlock, draw_token_mask
from mdpd_vl.distill.hfd import deep_loss, shallow_loss
from mdpd_vl.distill.losses import logits_mse, relational_kl
from mdpd_vl.distill.phases import phase as mark
from mdpd_vl.distill.steps import watch_optimizer_steps
from mdpd_vl.distill.trainable import FeatureStudent, backbone_groups, faded
from mdpd_vl.errors import UserError
from mdpd_vl.export import FadedModel, run_head
from mdpd_vl.heads.pooling import LayerPoolHead
from mdpd_vl.side.base import SideNetwork, SideOutput
from mdpd_vl.side.lst import mask_for

TaskLoss = Callable[[Tensor], Tensor]
GROUP_NAMES = ("side", "distill", "side_head", "backbone_head", "backbone_norms")
BACKBONE_MODES = ("eval", "bn_eval")
BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def set_frozen_mode(module: nn.Module, mode: str, training: bool) -> None:
    """Frozen-backbone mode: 'eval' = whole module in eval; 'bn_eval' = as `training`, BatchNorm in eval;
    'train' = as `training` (full fine-tuning)."""
    if mode == "eval":
        module.eval()
        return
    module.train(training)
    if mode == "bn_eval":
        for m in module.modules():
            if isinstance(m, BN_TYPES):
                m.eval()


@dataclass
class DualPathOutput:
    """Both outputs of one step, the side-to-backbone teacher and the named, already weighted losses.

    `y_teacher` is what every side-to-backbone term must learn from (detached): the EMA teacher's
    output when `ema_teacher` is set, else the live side output `y_side`. Task layers that add their
    own side-to-backbone terms (the cross-modal relational KL of retrieval) use it too.
    """

    y_side: Tensor
    y_backbone: Tensor
    losses: dict[str, Tensor]
    y_teacher: Tensor | None = None
    phase: str = "joint"

    @property
    def loss(self) -> Tensor:
        """The training objective: the sum of the weighted losses (0 when there are none)."""
        if not self.losses:
            return self.y_side.new_zeros(())
        return torch.stack(list(self.losses.values())).sum()


class SideKeptModel(nn.Module):
    """Backbone (frozen, run without grad) + side network + side head: the side-kept deployment."""

    def __init__(self, backbone: Backbone, side: SideNetwork, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.side = side
        self.head = head

    def forward(self, x: Any) -> Tensor:
        # the backbone runs only as far as the side network reads (SHERL re-runs its last blocks itself)
        with torch.no_grad():
            feats, emb = self.side.backbone_inputs(self.backbone, x)
        valid = self.backbone.padding_mask(x)
        out = self.side([f.detach() for f in feats], valid, None if emb is None else emb.detach())
        return self.head(out.tokens, mask_for(valid, out.tokens.shape[1]))


class EmaTeacher(nn.Module):
    """An exponential moving average of the side network + side head parameters, held as buffers.

    The teacher runs the LIVE modules with the averaged tensors substituted
    (`torch.func.functional_call`), so nothing is deep-copied: tensors a side network borrows
    from the backbone (SHERL's late route) stay shared, and the live buffers are used.
    """

    def __init__(self, side: SideNetwork, head: nn.Module, backbone: Backbone, decay: float):
        super().__init__()
        self.decay = decay
        shared = {id(p) for p in backbone.parameters()}
        self.names = {
            "side": [n for n, p in side.named_parameters() if id(p) not in shared],
            "head": [n for n, _ in head.named_parameters()],
        }
        for part, module in (("side", side), ("head", head)):
            for i, name in enumerate(self.names[part]):
                self.register_buffer(f"{part}{i}", module.get_parameter(name).detach().clone())

    def _tensors(self, part: str) -> dict[str, Tensor]:
        return {name: self.get_buffer(f"{part}{i}") for i, name in enumerate(self.names[part])}

    @torch.no_grad()
    def update(self, side: SideNetwork, head: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * live, for every side / side-head parameter."""
        for part, module in (("side", side), ("head", head)):
            for name, ema in self._tensors(part).items():
                ema.lerp_(module.get_parameter(name).detach(), 1.0 - self.decay)

    @torch.no_grad()
    def forward(self, side: SideNetwork, head: nn.Module, feats: list[Tensor], valid: Tensor | None,
                embeddings: Tensor | None = None) -> Tensor:
        out = functional_call(side, self._tensors("side"), (feats, valid, embeddings), strict=False)
        return functional_call(head, self._tensors("head"), (out.tokens, mask_for(valid, out.tokens.shape[1])),
                               strict=False)


class DualPath(nn.Module):
    """Backbone + side network + per-layer bottlenecks phi + generation blocks G + both heads."""

    def __init__(
        self,
        backbone: Backbone,
        side: SideNetwork,
        head_side: nn.Module,
        head_backbone: nn.Module,
        cfg: DistillConfig | None = None,
    ):
        super().__init__()
        cfg = (cfg or DistillConfig()).validate()
        self.cfg = cfg
        if backbone.num_layers == 0:
            raise UserError("the backbone exposes no layers to distil", field="backbone")
        if len(side.layer_widths) != backbone.num_layers:
            raise UserError(
                f"the side network gives {len(side.layer_widths)} layers, the backbone "
                f"{backbone.num_layers}; MDPD pairs s_l with b_l",
                field="side",
            )
        self.backbone, self.side = backbone, side
        extra = cfg.head_layer_indices(backbone.num_layers)
        if extra:  # W_B also reads pooled features of earlier layers (computed anyway at inference)
            widths = backbone.widths
            head_backbone = LayerPoolHead(head_backbone, extra, [widths[i] for i in extra], widths[-1])
        self.head_side, self.head_backbone = head_side, head_backbone
        self.shallow_layers, self.deep_layers = self._split_layers(cfg, backbone.num_layers)
        self._check_width(cfg, side.layer_widths, backbone.widths)
        self._build_distill_modules(cfg, side.layer_widths, backbone)
        self.feature_student = FeatureStudent(backbone.widths[-1], side.out_width) if cfg.feature_logits > 0 else None
        self._backbone_groups = backbone_groups(cfg, backbone)  # injects LoRA for `lowrank`
        self._backbone_trains = any(self._backbone_groups.values())
        self._freeze()
        backbone.set_checkpointing(cfg.checkpointing)
        self.ema = EmaTeacher(side, head_side, backbone, cfg.ema_teacher) if cfg.ema_teacher is not None else None
        self.backbone_mode = "eval"
        self.step = 0  # training forwards (seeds the masks: every micro-batch draws its own)
        self.optimizer_steps = 0  # optimiser steps taken on this model (alternate phase, EMA updates)
        self.last_masks: dict[int, Tensor] = {}
        watch_optimizer_steps(self)
        self.train(self.training)

    # -- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _split_layers(cfg: DistillConfig, num_layers: int) -> tuple[list[int], list[int]]:
        layers = list(range(num_layers)) if cfg.feature_layers == "all" else list(cfg.feature_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(
                f"layer indices {bad} are outside the backbone's 0..{num_layers - 1}",
                field="distill.feature_layers",
            )
        layers = sorted(layers)
        n_shallow = math.floor(cfg.split * len(layers))  # odd counts: the extra layer generates
        return layers[:n_shallow], layers[n_shallow:]

    def _check_width(self, cfg: DistillConfig, side_widths: list[int], backbone_widths: list[int]) -> None:
        """d is capped per layer at the layer's narrower width (CNN stages grow from a few dozen to
        a thousand channels); a d wider than every distilled layer is a mistake, not a cap."""
        layers = self.shallow_layers + self.deep_layers
        if not layers:
            return
        widest = max(min(side_widths[i], backbone_widths[i]) for i in layers)
        if cfg.d > widest:
            raise UserError(
                f"bottleneck width {cfg.d} exceeds every distilled layer's width (at most {widest}; "
                f"side {side_widths}, backbone {backbone_widths}); phi must reduce",
                field="distill.d",
            )

    def _build_distill_modules(self, cfg: DistillConfig, side_widths: list[int], backbone: Backbone) -> None:
        """phi per distilled layer (or one per distinct width triple with `share_phi`), G per deep layer
        (in the backbone's or the bottleneck's width, `gen_width`) and the learnable mask tokens."""
        specs, widths = backbone.layer_specs, backbone.widths
        hidden = cfg.gen_hidden or cfg.d
        code = {i: self.bottleneck_width(cfg, side_widths[i], widths[i]) for i in self.shallow_layers + self.deep_layers}
        self._phi_key = {
            i: (f"{side_widths[i]}_{code[i]}_{widths[i]}" if cfg.share_phi else str(i)) for i in code
        }
        self.phi = nn.ModuleDict()
        for i, key in self._phi_key.items():
            if key not in self.phi:
                self.phi[key] = Bottleneck(side_widths[i], code[i], widths[i])
        self.generators = nn.ModuleDict({str(i): self._generator(cfg, specs[i], hidden, code[i]) for i in self.deep_layers})
        # one learnable mask token per distinct width it replaces (layers of equal width share it):
        # D_B for the paper's G, the code width d with gen_width: bottleneck; gen_width: code has none
        # (the weights of its mask channel play that part)
        self._token_width = {
            i: code[i] if cfg.gen_width == "bottleneck" else widths[i] for i in self.deep_layers if cfg.gen_width != "code"
        }
        self.mask_tokens = nn.ParameterDict(
            {str(w): nn.Parameter(torch.randn(w) * 0.02) for w in sorted(set(self._token_width.values()))}
        )

    @staticmethod
    def _generator(cfg: DistillConfig, spec: LayerSpec, hidden: int, code: int) -> GenerationBlock:
        """G of one deep layer in the width `gen_width` asks for."""
        if cfg.gen_width == "bottleneck":
            return GenerationBlock(spec, hidden, code, code)
        if cfg.gen_width == "code":
            return GenerationBlock(spec, hidden, in_width=code + 2)  # code + the two indicator channels
        return GenerationBlock(spec, hidden)

    def phi_of(self, layer: int) -> Bottleneck:
        """The bottleneck phi of layer `layer` (shared between layers with `share_phi`)."""
        return self.phi[self._phi_key[layer]]  # type: ignore[return-value]

    @staticmethod
    def bottleneck_width(cfg: DistillConfig, side_width: int, backbone_width: int) -> int:
        """phi's width at one layer: d, capped at that layer's narrower width."""
        return min(cfg.d, side_width, backbone_width)

    def _freeze(self) -> None:
        """requires_grad is set from the explicit groups, never from parameter names."""
        self.backbone.requires_grad_(False)
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        for name, params in self.param_groups().items():
            for p in params:
                if not name.startswith("backbone_") and id(p) in backbone_ids:
                    continue  # a side network borrowing frozen backbone blocks keeps them frozen
                p.requires_grad_(True)

    # -- parameter groups ---------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named, disjoint parameter groups: side, distill, side_head, backbone_head, backbone_norms, and
        `backbone_biases` (norms_biases) or `backbone_lowrank` (lowrank) when the choice trains them."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        distill = list(self.phi.parameters()) + list(self.generators.parameters())  # shared phi: once
        distill += list(self.mask_tokens.values())
        if self.feature_student is not None:
            distill += list(self.feature_student.parameters())
        return {
            "side": [p for p in self.side.parameters() if id(p) not in backbone_ids],
            "distill": distill,
            "side_head": list(self.head_side.parameters()),
            "backbone_head": list(self.head_backbone.parameters()),
            **self._backbone_groups,
        }

    # -- modes --------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> DualPath:
        """Train the side/distill/heads; the frozen backbone follows `backbone_mode`; the EMA teacher is
        always in eval mode."""
        super().train(mode)
        set_frozen_mode(self.backbone, self.backbone_mode, mode)
        if self.ema is not None:
            self.ema.eval()
        return self

    def set_backbone_mode(self, mode: str) -> None:
        """'eval' (default) or 'bn_eval' for the frozen backbone (see the module docstring)."""
        if mode not in BACKBONE_MODES:
            raise UserError(f"unknown mode {mode!r}; valid: {', '.join(BACKBONE_MODES)}", field="backbone_mode")
        self.backbone_mode = mode
        self.train(self.training)

    def get_extra_state(self) -> Tensor:
        # the counters decide the masks and the alternate phase, so exact resume needs them
        return torch.tensor([self.step, self.optimizer_steps], dtype=torch.long)

    def set_extra_state(self, state: Any) -> None:
        values = torch.as_tensor(state).reshape(-1).tolist()
        self.step = int(values[0])
        self.optimizer_steps = int(values[1]) if len(values) > 1 else self.step

    # -- once per optimiser step (distill/steps.py) ----------------------------------------------
    def watched_parameters(self) -> list[nn.Parameter]:
        """One parameter of each non-empty group: an optimizer holding any of them trains this model."""
        return [params[0] for params in self.param_groups().values() if params]

    def after_optimizer_step(self) -> None:
        """Advance the alternate phase and move the EMA teacher towards the live side path."""
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update(self.side, self.head_side)

    def _phase(self) -> str:
        """'joint', or for `alternate` the phase of the current optimiser step: even steps train the
        side path, odd steps the backbone path (every micro-batch of one step shares its phase)."""
        if not self.training:
            return "joint"
        if self.optimizer_steps < self.cfg.side_warmup_steps:
            return "side"  # side-only warm-up: the teacher settles before it teaches
        if self.cfg.schedule == "joint":
            return "joint"
        return "side" if self.optimizer_steps % 2 == 0 else "backbone"

    @property
    def phases(self) -> tuple[str, ...]:
        """The distinct training phases (the benchmark times each)."""
        return ("side", "backbone") if self.cfg.schedule == "alternate" else ("joint",)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: Any, task_loss: TaskLoss | None = None) -> DualPathOutput:
        """One dual-path pass. `task_loss(y) -> scalar` (closing over the labels) is optional:
        recipes whose task loss couples two towers compute it outside on `y_side`/`y_backbone`, and
        learn the backbone path from `y_teacher`."""
        cfg, grad = self.cfg, torch.is_grad_enabled()
        phase = self._phase()
        valid = self.backbone.padding_mask(x)
        with mark("backbone"), torch.set_grad_enabled(grad and self._backbone_trains and phase != "side"):
            feats = self.backbone.features(x, with_input=self.side.reads_input)
        emb = self._frozen(feats.pop(0)) if self.side.reads_input else None
        side_in = [self._frozen(f) for f in feats]
        with torch.set_grad_enabled(grad and phase != "backbone"):
            with mark("side"):
                side_out = self.side(side_in, valid, emb)
            with mark("heads"):
                y_side = self.head_side(side_out.tokens, mask_for(valid, side_out.tokens.shape[1]))
        with mark("heads"), torch.set_grad_enabled(grad and phase != "side"):
            y_backbone = run_head(self.head_backbone, feats, valid)
        if self.ema is not None and phase != "side":
            with mark("side"):
                y_teacher = self.ema(self.side, self.head_side, side_in, valid, emb)
        else:
            y_teacher = y_side.detach()

        losses: dict[str, Tensor] = {}
        if phase != "backbone":
            if task_loss is not None:
                with mark("losses"):
                    losses["task_side"] = cfg.task_weight * task_loss(y_side)
            losses.update(self._feature_losses(side_in, side_out, valid))
        with mark("losses"):
            losses.update(self._backbone_losses(phase, y_teacher, y_backbone, task_loss))
            if self.feature_student is not None and phase != "side":
                losses["feature_logits"] = cfg.feature_logits * self.feature_student.loss(feats[-1], side_out, valid)
        if self.training and grad:
            self.step += 1
        return DualPathOutput(y_side=y_side, y_backbone=y_backbone, losses=losses, y_teacher=y_teacher, phase=phase)

    def _backbone_losses(self, phase: str, y_teacher: Tensor, y_backbone: Tensor,
                         task_loss: TaskLoss | None) -> dict[str, Tensor]:
        cfg, losses = self.cfg, {}
        if phase != "side":
            if cfg.logits != "none":
                if cfg.logits == "mse":
                    raw = logits_mse(y_teacher, y_backbone)
                else:
                    raw = relational_kl(y_teacher, y_backbone, cfg.temperature)
                losses["logits"] = cfg.logits_weight * raw
            if cfg.task_on_backbone and task_loss is not None:
                losses["task_backbone"] = cfg.task_weight * task_loss(y_backbone)
        return losses

    def _frozen(self, feature: Tensor) -> Tensor:
        """A frozen feature as the side network and the losses read it: a detached view, cast to the
        autocast dtype under autocast (`feature_dtype: compute`) so 12 layers of teachers cost half."""
        out = feature.detach()
        if self.cfg.feature_dtype == "compute" and torch.is_autocast_enabled(out.device.type):
            dtype = torch.get_autocast_dtype(out.device.type)
            if out.is_floating_point() and out.dtype != dtype:
                out = out.to(dtype)
        return out

    def _mask_generator(self) -> torch.Generator:
        # seeded from (seed, step): reproducible, and exact after resume without saving RNG state
        return torch.Generator().manual_seed((self.cfg.seed * 0x9E3779B1 + self.step) % (2**63))

    def _feature_losses(self, teachers: list[Tensor], students: SideOutput, valid: Tensor | None) -> dict[str, Tensor]:
        cfg, out = self.cfg, {}
        if self.shallow_layers:
            total = teachers[0].new_zeros((), dtype=torch.float32)
            for i in self.shallow_layers:
                v = _valid_for(valid, teachers[i])
                total = total + shallow_loss(cfg, self.phi_of(i), teachers[i], students, i, v)
            out["shallow"] = cfg.shallow_weight * total
        if self.deep_layers:
            gen = self._mask_generator()
            by_shape: dict[tuple[int, int], Tensor] = {}
            total = teachers[0].new_zeros((), dtype=torch.float32)
            self.last_masks = {}
            for i in self.deep_layers:
                b = teachers[i]
                key = (b.shape[1], self.backbone.layer_specs[i].prefix)
                if key not in by_shape:  # one mask per sample, shared by deep layers of equal length
                    by_shape[key] = draw_token_mask(b.shape[0], key[0], cfg.mask_ratio, gen, key[1]).to(b.device)
                m = by_shape[key]
                self.last_masks[i] = m
                token = self.mask_tokens[str(self._token_width[i])] if i in self._token_width else None
                block = self.generators[str(i)]
                total = total + deep_loss(cfg, self.phi_of(i), block, token, b, students, i, m, _valid_for(valid, b))
            out["deep"] = cfg.deep_weight * total
        return out

    # -- deployment ---------------------------------------------------------------------------
    def fade(self) -> FadedModel:
        """Backbone (with its tuned norms or biases) + W_B only: no side, phi, G or mask parameter is
        referenced. With `lowrank`, a copy with the deltas merged into the weights (the bare architecture)."""
        return faded(self.cfg, self.backbone, self.head_backbone)

    def side_kept(self) -> SideKeptModel:
        """Backbone + side network + side head: to evaluate the side path."""
        return SideKeptModel(self.backbone, self.side, self.head_side)


def _valid_for(valid: Tensor | None, tokens: Tensor) -> Tensor | None:
    """The padding mask applies to layers with the sequence's token count (text)."""
    if valid is None or valid.shape[1] != tokens.shape[1]:
        return None
    return valid
