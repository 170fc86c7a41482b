"""The Backbone protocol: any encoder exposing per-layer token features through forward hooks.

Every layer feature is returned as tokens `B x N x D` (CNN maps `B x C x H x W` are flattened to
`B x HW x C`), so side networks and distillation see one layout. The spatial arrangement lives in
`LayerSpec.grid` (+ `prefix` non-grid tokens such as a ViT class token); text layers have no grid.
All shapes are read from the wrapped model by probing it once, never written as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


@dataclass
class Precomputed:
    """Per-layer features computed earlier (the frozen-feature cache): `features()` returns them as
    they are and `padding_mask()` returns `mask`, so every method runs unchanged on cached inputs."""

    layers: list[Tensor]
    mask: Tensor | None = None

    def __len__(self) -> int:
        return self.layers[0].shape[0]


@dataclass(frozen=True)
class LayerSpec:
    """Layout of one layer's tokens: width D, spatial grid of the non-prefix tokens, prefix count."""

    width: int
    grid: tuple[int, int] | None = None
    prefix: int = 0

    def grid_for(self, num_tokens: int) -> tuple[int, int] | None:
        """The grid for `num_tokens` tokens at run time (input size may differ from the probe)."""
        if self.grid is None:
            return None
        h, w = self.grid
        n = num_tokens - self.prefix
        if n == h * w:
            return (h, w)
        scale = math.sqrt(n / (h * w))
        gh, gw = round(h * scale), round(w * scale)
        if gh * gw != n:
            raise ValueError(f"{n} grid tokens do not fit the {h}x{w} aspect ratio of this layer")
        return (gh, gw)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers whose affine scale/shift MDPD may tune."""
    if isinstance(module, NORM_TYPES):
        return True
    # transformers / timm ship their own norm classes (e.g. LayerNorm2d, RMSNorm, BatchNormAct2d)
    name = type(module).__name__.lower()
    return "norm" in name and any(p is not None for p in module.parameters(recurse=False))


class Backbone(nn.Module):
    """Base class of every backbone wrapper.

    Subclasses set `self.model`, implement `_block_modules()`, `_run(x)` (the model's forward,
    whose hooked block outputs become the layers), `_to_tokens(i, out)`, `example_input()` and
    `spec()`, then call `self._setup()` at the end of `__init__`.
    """

    modality: str = "image"  # "image" | "text" | "video"

    def __init__(self) -> None:
        super().__init__()
        self._store: dict[int, Any] = {}
        self._hooks: list[Any] = []
        self.layer_specs: list[LayerSpec] = []
        self._checkpointing = False

    # -- to implement -------------------------------------------------------------------------
    def _block_modules(self) -> list[nn.Module]:
        """The modules whose outputs are the layers b_1..b_L, shallow to deep."""
        raise NotImplementedError

    def _run(self, x: Any) -> Any:
        """Run the wrapped model far enough that every hooked block has fired; return its output."""
        raise NotImplementedError

    def _to_tokens(self, index: int, out: Any) -> Tensor:
        """Convert block `index`'s raw output (maybe a tuple or a map) to `B x N x D` tokens."""
        out = out[0] if isinstance(out, (tuple, list)) else out
        if out.dim() == 4:  # B x C x H x W -> B x HW x C
            return out.flatten(2).transpose(1, 2)
        return out

    def example_input(self, batch_size: int = 2) -> Any:
        """A valid input batch, used to probe the shapes."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable recipe that rebuilds this backbone (without weights): see export."""
        raise NotImplementedError

    # -- protocol -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_specs)

    @property
    def widths(self) -> list[int]:
        return [s.width for s in self.layer_specs]

    @property
    def grid(self) -> tuple[int, int] | None:
        """Patch grid of the deepest layer (None for text)."""
        return self.layer_specs[-1].grid if self.layer_specs else None

    @property
    def blocks(self) -> list[nn.Module]:
        return self._block_modules()

    def features(self, x: Any) -> list[Tensor]:
        """Per-layer token features `[b_1, ..., b_L]`, each `B x N_l x D_l`."""
        if isinstance(x, Precomputed):
            return list(x.layers)
        self._store.clear()
        self._run(x)
        missing = [i for i in range(len(self._hooks)) if i not in self._store]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: blocks {missing} did not run")
        feats = [self._to_tokens(i, self._store[i]) for i in range(len(self._hooks))]
        self._store.clear()
        return feats

    def padding_mask(self, x: Any) -> Tensor | None:
        """`B x N` bool mask of valid tokens for sequence inputs; None when every token is valid."""
        return x.mask if isinstance(x, Precomputed) else None

    def output(self, x: Any) -> Tensor:
        """The wrapped model's own output (embedding, pooled features or logits)."""
        return self._run(x)

    def norm_parameters(self, last_k: int | None = None) -> list[tuple[str, nn.Parameter]]:
        """Affine parameters of norm layers inside the blocks (the last `last_k` blocks if given)."""
        blocks = self._block_modules()
        if last_k is not None:
            blocks = blocks[len(blocks) - last_k :] if last_k > 0 else []
        seen: set[int] = set()
        out: list[tuple[str, nn.Parameter]] = []
        names = {id(p): n for n, p in self.named_parameters()}
        for block in blocks:
            for module in block.modules():
                if not is_norm(module):
                    continue
                for p in module.parameters(recurse=False):
                    if id(p) not in seen:
                        seen.add(id(p))
                        out.append((names[id(p)], p))
        return out

    def set_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of every block: recompute block activations in backward."""
        if enabled == self._checkpointing:
            return
        for block in self._block_modules():
            if enabled:
                block._mdpd_forward = block.forward  # type: ignore[attr-defined]
                block.forward = _checkpointed(block._mdpd_forward)  # type: ignore[attr-defined]
            else:
                block.forward = block._mdpd_forward  # type: ignore[attr-defined]
                del block._mdpd_forward
        self._checkpointing = enabled

    def forward(self, x: Any) -> list[Tensor]:
        return self.features(x)

    # -- helpers for subclasses -----------------------------------------------------------------
    def _setup(self) -> None:
        """Register the hooks and probe the layer shapes with `example_input()`."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = [
            block.register_forward_hook(self._make_hook(i))
            for i, block in enumerate(self._block_modules())
        ]
        if not self._hooks:
            raise ValueError(f"{type(self).__name__} exposes no layers")
        was_training = self.training
        self.eval()
        with torch.no_grad():
            x = self.example_input(2)
            feats = self.features(x)
        self.train(was_training)
        self.layer_specs = [self._layer_spec(i, f) for i, f in enumerate(feats)]

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        """Default: no grid. Image wrappers override to report their patch grid."""
        return LayerSpec(width=tokens.shape[-1])

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            # keyed by index, so a checkpoint recompute overwrites rather than appends
            self._store[index] = out

        return hook


def _checkpointed(fn: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    return forward


def grid_from_map(shape: Sequence[int]) -> tuple[int, int]:
    """(H, W) of a `B x C x H x W` map."""
    return (int(shape[-2]), int(shape[-1]))
