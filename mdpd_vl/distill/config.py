"""DistillConfig: every choice of the dual-path distillation, validated with the field named."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from mdpd_vl.backbones.base import checkpoint_segments
from mdpd_vl.errors import UserError

BACKBONE_TRAINABLE = ("head", "norms_last_k", "norms_all", "norms_biases", "lowrank")
GEN_WIDTHS = ("backbone", "code", "bottleneck")
DEEP_OUTPUTS = ("masked", "all")
FEATURE_DTYPES = ("compute", "native")
# the checkpointing granularity `+ckpt` means in the benchmark and the docs: the best measured trade-off
# of step time against peak memory for norms_all (tasks/bench.md, "checkpoint granularity")
RECOMMENDED_CHECKPOINTING = "every_2"
LOGITS_OBJECTIVES = ("mse", "relational", "none")
SCHEDULES = ("joint", "alternate")


@dataclass
class DistillConfig:
    """Masked Dual Path Distillation settings (paper sec. 3.2-3.3, supplementary B).

    All feature and logits losses are SUM-reduced over tokens and channels and MEAN-reduced over
    the batch (see `distill/losses.py`): the paper's tiny weights (1e-4 / 6e-5 / 4e-5) only make
    sense against sum-reduced losses, whose magnitude grows with N x D.
    """

    d: int = field(
        default=64,
        metadata={"help": 'bottleneck width of phi (M_down: D_S x d, M_up: d x D_B); must not exceed any D_S or D_B.'},
    )
    gen_hidden: int | None = field(
        default=None,
        metadata={"help": 'hidden channels of the generation block G (Conv3x3 -> ReLU -> Conv3x3); None = d.'},
    )
    gen_width: str = field(
        default="backbone",
        metadata={"help": "how G is parametrised: 'backbone' (the paper: G maps the masked phi(s), D_B wide, to D_B), "
                  "'code' (the same map, its first conv learnt on phi's masked code: d + 2 input channels instead "
                  "of D_B, the same function class) or 'bottleneck' (G maps the masked code, d wide, to d and phi's "
                  "M_up lifts it to D_B: 9 x 2 x d x hidden instead of 9 x 2 x D_B x hidden weights per deep layer)."},
    )
    deep_outputs: str = field(
        default="masked",
        metadata={"help": "where G's second conv (and the lift to D_B) is computed: 'masked' = only at the masked "
                  "tokens the deep loss reads (exact: the loss ignores the others), 'all' = every token."},
    )
    fold_up: bool = field(
        default=True,
        metadata={"help": "gen_width backbone: fold phi's M_up and the mask token into G's first conv, so the D_B-wide "
                  "masked map is never materialised (exact reparametrisation of the same function)."},
    )
    fuse_loss: bool = field(
        default=True,
        metadata={"help": "compute the last map before each feature loss (phi's M_up for imitation and for the "
                  "bottleneck G, G's second conv for the paper's G) inside the squared error and rebuild it in "
                  "backward, so no D_B-wide output or difference is kept for backward (exact)."},
    )
    share_phi: bool = field(
        default=False,
        metadata={"help": "one bottleneck phi for all distilled layers of equal widths instead of one per layer."},
    )
    feature_dtype: str = field(
        default="compute",
        metadata={"help": "dtype of the detached frozen features (side inputs, teachers) under autocast: 'compute' = "
                  "the autocast dtype (bf16: half the bytes), 'native' = as the backbone returns them. Losses are "
                  "always accumulated in float32."},
    )
    mask_ratio: float = field(
        default=0.5,
        metadata={"help": 'lambda: probability that a token of a deep layer is replaced by the mask token; in [0, 1).'},
    )
    split: float = field(
        default=0.5,
        metadata={"help": 'fraction of the feature layers (shallowest first) that imitate; the rest generate.'},
    )
    feature_layers: str | list[int] = field(
        default="all",
        metadata={"help": "'all' or 0-based indices into the backbone's layers b_1..b_L that get feature distillation."},
    )
    logits: str = field(
        default="mse",
        metadata={"help": "logits objective: 'mse' (paper eq. 3), 'relational' (in-batch similarity KL) or 'none'."},
    )
    temperature: float = field(
        default=0.1,
        metadata={"help": "temperature T of the relational objective's softmax(y y^T / T) over L2-normalised outputs."},
    )
    task_on_backbone: bool = field(
        default=False,
        metadata={"help": 'also apply the task loss to the backbone path y_B (not in the paper; see issue 7).'},
    )
    ema_teacher: float | None = field(
        default=None,
        metadata={"help": 'decay of an EMA copy of side network + side head used as the logits teacher; None = live side.'},
    )
    task_weight: float = field(
        default=1.0,
        metadata={"help": 'weight of the task loss(es) (supplementary B: 1).'},
    )
    logits_weight: float = field(
        default=1e-4,
        metadata={"help": 'weight of the logits loss (supplementary B: 1e-4). Losses are summed over tokens and channels and averaged over the batch: the tiny paper weights only balance sum-reduced terms against a task loss of order 1.'},
    )
    deep_weight: float = field(
        default=6e-5,
        metadata={"help": 'weight of the deep-layer masked generation loss (supplementary B: 6e-5; sum over masked tokens and channels, mean over the batch).'},
    )
    shallow_weight: float = field(
        default=4e-5,
        metadata={"help": 'weight of the shallow-layer imitation loss (supplementary B: 4e-5; sum over tokens and channels, mean over the batch).'},
    )
    backbone_trainable: str = field(
        default="norms_all",
        metadata={"help": "which backbone tensors train: 'head' (W_B only), 'norms_last_k', 'norms_all' (paper), "
                  "'norms_biases' (every norm + every bias inside the blocks) or 'lowrank' (peft LoRA deltas on the "
                  "blocks' linear layers, merged into the weights by fade(): the deployed model is the bare "
                  "architecture)."},
    )
    lowrank_r: int = field(
        default=8, metadata={"help": "rank of the low-rank deltas when backbone_trainable=lowrank."},
    )
    lowrank_alpha: float = field(
        default=16.0, metadata={"help": "scale numerator of the low-rank deltas (scale = alpha / rank)."},
    )
    head_layers: str | list[int] | dict[str, str | list[int]] = field(
        default="last",
        metadata={"help": "what the deployed head W_B reads: 'last' (the paper: the last layer), 'last_<k>' (the "
                  "last layer + pooled features of the k - 1 layers before it), 'all' (+ every earlier layer) or "
                  "a list of 0-based layer indices whose pooled features are added (the last layer is always read); "
                  "or one of these per tower of a two-tower task, e.g. {image: last, text: last_3} (a tower not "
                  "named reads 'last')."},
    )
    feature_logits: float = field(
        default=0.0,
        metadata={"help": "weight of the last-layer feature distillation side -> backbone: a learnt regressor on "
                  "b_L imitates the side network's last-layer tokens (sum-reduced squared error, teacher "
                  "detached; dropped at fading); 0 = off. Needs a trainable backbone."},
    )
    side_warmup_steps: int = field(
        default=0,
        metadata={"help": "optimiser steps at the start that train the side path only (the backbone path runs "
                  "without grad and gets no loss) before distillation starts: a teacher that moves less."},
    )
    last_k: int = field(
        default=1,
        metadata={"help": 'number of deepest backbone blocks whose norms train when backbone_trainable=norms_last_k.'},
    )
    checkpointing: bool | str | int = field(
        default=False,
        metadata={"help": "activation checkpointing of the backbone blocks (recompute in backward, saves memory): "
                  "none | all | every_<k> (every k-th block; an integer k too) | sqrt (sqrt(L) segments); "
                  "true = all, false = none. tasks/bench.md measures each."},
    )
    schedule: str = field(
        default="joint",
        metadata={"help": "'joint' (all losses every step) or 'alternate' (even steps side path, odd steps backbone path)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": 'seed of the mask generator (the mask of step t is drawn from seed and t, so resume is exact).'},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str | None = None, prefix: str = "") -> DistillConfig:
        """Raise one UserError naming the first invalid field; return self when all are valid.

        Fields are named bare (`mask_ratio`); the config loader prefixes the section (`distill.`).
        """

        def bad(name: str, msg: str) -> UserError:
            err = UserError(msg, where=where, field=prefix + name)
            err.detail = msg  # type: ignore[attr-defined]
            return err

        if not isinstance(self.d, int) or self.d < 1:
            raise bad("d", f"bottleneck width must be a positive integer, got {self.d!r}")
        if self.gen_hidden is not None and (not isinstance(self.gen_hidden, int) or self.gen_hidden < 1):
            raise bad("gen_hidden", f"must be a positive integer or null, got {self.gen_hidden!r}")
        if not isinstance(self.mask_ratio, (int, float)) or not 0.0 <= self.mask_ratio < 1.0:
            raise bad("mask_ratio", f"lambda must lie in [0, 1), got {self.mask_ratio!r}")
        if not isinstance(self.split, (int, float)) or not 0.0 <= self.split <= 1.0:
            raise bad("split", f"must lie in [0, 1] (fraction of imitating layers), got {self.split!r}")
        fl = self.feature_layers
        if not (fl == "all" or (isinstance(fl, list) and all(isinstance(i, int) for i in fl))):
            raise bad("feature_layers", f"must be 'all' or a list of layer indices, got {fl!r}")
        if isinstance(fl, list) and len(set(fl)) != len(fl):
            raise bad("feature_layers", f"repeats a layer index: {fl!r}")
        if self.logits not in LOGITS_OBJECTIVES:
            raise bad("logits", f"unknown objective {self.logits!r}; valid: {', '.join(LOGITS_OBJECTIVES)}")
        if not self.temperature > 0:
            raise bad("temperature", f"must be > 0, got {self.temperature!r}")
        if self.ema_teacher is not None and not 0.0 <= self.ema_teacher < 1.0:
            raise bad("ema_teacher", f"EMA decay must lie in [0, 1) or be null, got {self.ema_teacher!r}")
        for name in ("task_weight", "logits_weight", "deep_weight", "shallow_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise bad(name, f"loss weight must be a number >= 0, got {value!r}")
        if self.backbone_trainable not in BACKBONE_TRAINABLE:
            valid = ", ".join(BACKBONE_TRAINABLE)
            raise bad("backbone_trainable", f"unknown choice {self.backbone_trainable!r}; valid: {valid}")
        self._validate_fading(bad)
        for name, valid in (("gen_width", GEN_WIDTHS), ("deep_outputs", DEEP_OUTPUTS),
                            ("feature_dtype", FEATURE_DTYPES)):
            if getattr(self, name) not in valid:
                raise bad(name, f"unknown choice {getattr(self, name)!r}; valid: {', '.join(valid)}")
        for name in ("fold_up", "fuse_loss", "share_phi"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, f"must be true or false, got {getattr(self, name)!r}")
        try:
            checkpoint_segments(self.checkpointing, 1)
        except ValueError as err:
            raise bad("checkpointing", str(err)) from None
        if not isinstance(self.last_k, int) or self.last_k < 1:
            raise bad("last_k", f"must be a positive integer, got {self.last_k!r}")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if self.schedule == "alternate" and self.logits == "none" and not self.task_on_backbone:
            raise bad("schedule", "alternate needs a backbone-path loss: set logits or task_on_backbone")
        if not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        return self

    def _validate_fading(self, bad: Callable[[str, str], UserError]) -> None:
        """The axes of the fading frontier (issue 16): low-rank deltas, multi-layer head, feature logits,
        side-only warm-up."""
        for name in ("lowrank_r", "side_warmup_steps"):
            value, low = getattr(self, name), 1 if name == "lowrank_r" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"must be an integer >= {low}, got {value!r}")
        if isinstance(self.lowrank_alpha, bool) or not isinstance(self.lowrank_alpha, (int, float)) \
                or not self.lowrank_alpha > 0:
            raise bad("lowrank_alpha", f"must be a number > 0, got {self.lowrank_alpha!r}")
        hl = self.head_layers
        for tower, spec in (hl.items() if isinstance(hl, dict) else [(None, hl)]):
            if isinstance(hl, dict) and not isinstance(tower, str):
                raise bad("head_layers", f"per-tower keys are tower names, got {tower!r}")
            _check_head_layers(spec, bad, tower)
        value = self.feature_logits
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise bad("feature_logits", f"loss weight must be a number >= 0, got {value!r}")
        if value > 0 and self.backbone_trainable == "head":
            raise bad("feature_logits", "distils into b_L, which does not train with backbone_trainable=head: "
                      "choose norms_last_k, norms_all, norms_biases or lowrank")

    def head_layer_indices(self, num_layers: int) -> list[int]:
        """The 0-based layers whose pooled features W_B reads besides the last one (ascending)."""
        hl = self.head_layers
        if isinstance(hl, dict):
            raise UserError(f"head_layers per tower ({hl!r}) needs a task with named towers (itr, vtr); give "
                            "this task one value", field="distill.head_layers")
        if hl == "last":
            return []
        if hl == "all":
            return list(range(num_layers - 1))
        k = _last_k(hl) if isinstance(hl, str) else None
        if k is not None:
            if k > num_layers:
                raise UserError(f"last_{k} asks for {k} layers; the backbone has {num_layers}",
                                field="distill.head_layers")
            return list(range(num_layers - k, num_layers - 1))
        bad = [i for i in hl if not 0 <= i < num_layers]  # type: ignore[union-attr]
        if bad:
            raise UserError(f"layer indices {bad} are outside the backbone's 0..{num_layers - 1}",
                            field="distill.head_layers")
        return sorted(i for i in hl if i != num_layers - 1)  # type: ignore[union-attr]

    def for_tower(self, tower: str, towers: tuple[str, ...]) -> DistillConfig:
        """This config as one tower of a task with `towers` sees it: a per-tower `head_layers` resolved
        to the tower's value ('last' where the tower is not named); unchanged otherwise."""
        hl = self.head_layers
        if not isinstance(hl, dict):
            return self
        unknown = sorted(set(hl) - set(towers))
        if unknown:
            raise UserError(f"names no tower of this task: {', '.join(unknown)}; its towers: {', '.join(towers)}",
                            field="distill.head_layers")
        return replace(self, head_layers=hl.get(tower, "last"))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str | None = None) -> DistillConfig:
        """Build from a plain dict (YAML); unknown keys are a UserError listing the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(
                f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}",
                where=where,
                field="distill",
            )
        try:
            return cls(**values)
        except UserError as err:  # re-raise with the file named
            raise UserError(getattr(err, "detail", str(err)), where=where, field=err.field) from None


def _check_head_layers(spec: Any, bad: Callable[[str, str], UserError], tower: str | None) -> None:
    """One head_layers value (of one tower when `tower` is given) is a name or a list of distinct indices."""
    where = f" (tower {tower!r})" if tower is not None else ""
    named = isinstance(spec, str) and (spec in ("last", "all") or _last_k(spec) is not None)
    listed = isinstance(spec, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec)
    if not (named or listed):
        raise bad("head_layers", f"must be 'last', 'last_<k>' (k >= 1), 'all' or a list of layer indices{where}, "
                  f"got {spec!r}")
    if listed and len(set(spec)) != len(spec):
        raise bad("head_layers", f"repeats a layer index{where}: {spec!r}")


def _last_k(text: str) -> int | None:
    """k of 'last_<k>' (k >= 1), else None."""
    head, _, tail = text.partition("_")
    return int(tail) if head == "last" and tail.isdigit() and int(tail) >= 1 else None
