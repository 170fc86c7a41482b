"""Config dataclasses of the side networks: reduction factor r, side width d, output width, extras.

`__post_init__` checks what can be checked alone; `validate(specs)` checks the fields against the
backbone's layer layout (widths, layer count). Both raise `SideConfigError`, which is a UserError
(one line naming the field) and a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mdpd_vl.backbones.base import LayerSpec
from mdpd_vl.errors import UserError


class SideConfigError(UserError, ValueError):
    """A side-network config field that does not fit (itself or the backbone)."""


@dataclass
class SideConfig:
    """Fields shared by every side network."""

    r: int = field(default=2, metadata={"help": "reduction factor: side width D_S = D_B // r per layer"})
    d: int | None = field(
        default=None,
        metadata={"help": "side/fusion width shared by all layers; None = deepest backbone width // r"},
    )
    out_width: int | None = field(
        default=None, metadata={"help": "width of the output tokens; None = deepest backbone width"}
    )

    def __post_init__(self) -> None:
        self._check_int("r", self.r, 1)
        if self.d is not None:
            self._check_int("d", self.d, 1)
        if self.out_width is not None:
            self._check_int("out_width", self.out_width, 1)

    # -- helpers ---------------------------------------------------------------------------------
    def error(self, name: str, message: str) -> SideConfigError:
        """A SideConfigError naming `<ConfigClass>.<name>`."""
        return SideConfigError(message, field=f"{type(self).__name__}.{name}")

    def _check_int(self, name: str, value: object, low: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {value!r}")
        if value < low:
            raise self.error(name, f"must be >= {low}, got {value}")

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of the config fields (used to report unknown keys)."""
        return [f.name for f in fields(cls)]

    # -- against the backbone --------------------------------------------------------------------
    def validate(self, specs: list[LayerSpec]) -> None:
        """Check the fields against the backbone layers; raise SideConfigError naming the field."""
        if not specs:
            raise SideConfigError("the backbone exposes no layers: a side network needs at least one",
                                  field="specs")
        for i, spec in enumerate(specs):
            if spec.width // self.r < 1:
                raise self.error("r", f"r={self.r} leaves layer {i} (width {spec.width}) with width 0")
        deepest = specs[-1].width
        if self.d is not None and self.d > deepest:
            raise self.error("d", f"d={self.d} is larger than the deepest backbone width {deepest}")

    def side_width(self, specs: list[LayerSpec]) -> int:
        """The fusion/ladder width d (default: deepest width // r)."""
        return self.d if self.d is not None else max(1, specs[-1].width // self.r)

    def output_width(self, specs: list[LayerSpec]) -> int:
        """The width of the output tokens (default: the deepest backbone width)."""
        return self.out_width if self.out_width is not None else specs[-1].width


UNIPT_VARIANTS = ("vse", "clip4clip")
CLASS_TOKENS = ("auto", "first", "last")


@dataclass
class UniPTConfig(SideConfig):
    """UniPT (CVPR 2024): per-layer projections, parameter-free cross-attention onto the anchor."""

    variant: str = field(
        default="vse",
        metadata={"help": "vse: the official VSE-infinity form (image-text retrieval; token or CNN-stage hosts); "
                  "clip4clip: the official CLIP4Clip form (one pooled anchor token; video retrieval)"},
    )
    class_token: str = field(
        default="auto",
        metadata={"help": "clip4clip: the class token of a text layer: first, last (valid token: CLIP's EOT) or "
                  "auto (last for causal text towers, else first); image layers use their prefix token"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in UNIPT_VARIANTS:
            raise self.error("variant", f"unknown variant {self.variant!r}; valid: {', '.join(UNIPT_VARIANTS)}")
        if self.class_token not in CLASS_TOKENS:
            raise self.error("class_token", f"must be one of {', '.join(CLASS_TOKENS)}, got {self.class_token!r}")


@dataclass
class SHERLConfig(SideConfig):
    """SHERL (ECCV 2024): redundancy-aware early fusion + gated late route through frozen blocks."""

    late_blocks: int = field(
        default=1,
        metadata={"help": "how many of the last frozen backbone blocks (CNN: units of the deepest stage) the "
                  "side output always goes through (official: 1)"},
    )
    gate_temperature: float = field(
        default=0.1, metadata={"help": "T of the late-route gate tanh(alpha / T); alpha starts at 0"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_int("late_blocks", self.late_blocks, 1)
        if not self.gate_temperature > 0:
            raise self.error("gate_temperature", f"must be > 0, got {self.gate_temperature}")

    def validate(self, specs: list[LayerSpec]) -> None:
        super().validate(specs)
        if self.late_blocks > len(specs) - 1:
            raise self.error(
                "late_blocks",
                f"late_blocks={self.late_blocks} needs at least {self.late_blocks + 1} backbone layers "
                f"(the input of the first re-run block is an earlier layer); the backbone has {len(specs)}",
            )


@dataclass
class LSTConfig(SideConfig):
    """LST (NeurIPS 2022): a ladder of small transformer blocks at width d (default D // r)."""

    layers: list[int] | None = field(
        default=None,
        metadata={"help": "0-based indices of the backbone layers that get a side block; None = all"},
    )
    init_from_backbone: bool = field(
        default=True,
        metadata={"help": "initialise side blocks by structured pruning (largest L1 norm) of the backbone "
                  "blocks, as the official scripts do; false = random init"},
    )
    heads: int | None = field(
        default=None,
        metadata={"help": "attention heads of the side blocks; None = backbone heads or width // 64"},
    )
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP hidden width / side width"})
    max_tokens: int = field(
        default=64,
        metadata={"help": "grid layers with more tokens (early CNN stages) run the ladder on an average-pooled "
                  "grid of at most this many tokens; s_l is upsampled back to b_l's grid for distillation"},
    )
    gate_temperature: float = field(
        default=0.1, metadata={"help": "T of the ladder gates sigmoid(alpha_l / T); alpha starts at 0"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)):
                raise self.error("layers", f"must be a list of layer indices, got {self.layers!r}")
            for i in self.layers:
                self._check_int("layers", i, 0)
            if len(set(self.layers)) != len(self.layers):
                raise self.error("layers", f"has duplicate indices: {list(self.layers)}")
            self.layers = sorted(self.layers)
        if self.heads is not None:
            self._check_int("heads", self.heads, 1)
        if not self.mlp_ratio > 0:
            raise self.error("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if not self.gate_temperature > 0:
            raise self.error("gate_temperature", f"must be > 0, got {self.gate_temperature}")

    def validate(self, specs: list[LayerSpec]) -> None:
        super().validate(specs)
        if self.layers is not None:
            bad = [i for i in self.layers if i >= len(specs)]
            if bad:
                raise self.error(
                    "layers", f"indices {bad} are out of range: the backbone has {len(specs)} layers "
                    f"(valid 0..{len(specs) - 1})"
                )
            if not self.layers:
                raise self.error("layers", "is empty: select at least one layer (or null for all)")
        width = self.side_width(specs)
        if self.heads is not None and width % self.heads:
            raise self.error("heads", f"heads={self.heads} does not divide the side width {width}")

    def selected(self, num_layers: int) -> list[int]:
        """The 0-based indices of the layers that get a side block."""
        return list(range(num_layers)) if self.layers is None else list(self.layers)
