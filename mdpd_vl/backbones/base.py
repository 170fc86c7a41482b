"""The Backbone protocol: any encoder exposing per-layer token features through forward hooks.

Every layer feature is returned as tokens `B x N x D` (CNN maps `B x C x H x W` are flattened to
`B x HW x C`), so side networks and distillation see one layout. The spatial arrangement lives in
`LayerSpec.grid` (+ `prefix` non-grid tokens such as a ViT class token); text layers have no grid.
All shapes are read from the wrapped model by probing it once, never written as numbers.
"""

from __future__ import annotations

import copy
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
    they are and `padding_mask()` returns `mask`, so every method runs unchanged on cached inputs.

    `layers` holds b_1..b_L, or b_0..b_L (L + 1 entries) when the input of the first block (b_0,
    the embeddings of a transformer) was cached too; the backbone tells the two apart by its depth.
    """

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


class _EarlyExit(Exception):
    """Raised by a temporary hook to stop the wrapped model after the last layer a caller needs."""


def _raise_exit(*_: Any) -> None:
    raise _EarlyExit


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden states a block is called with: the first tensor argument (or `hidden_states=`)."""
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"]
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    return None


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
        # layout of b_0 (the input of the first block) when it is a token sequence with b_1's layout
        # (transformer embeddings); None for CNN stems, whose input is a map of another grid
        self.input_spec: LayerSpec | None = None
        self._input_hook: Any = None
        self._want_input = False
        self._input: Any = None
        self._checkpointing: list[list[int]] = []

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

    def features(self, x: Any, *, with_input: bool = False, num_layers: int | None = None) -> list[Tensor]:
        """Per-layer token features `[b_1, ..., b_L]`, each `B x N_l x D_l`.

        `with_input`: prepend b_0, the input of the first block (transformer embeddings; needs
        `input_spec`). `num_layers=m`: only `[b_1..b_m]`, and the model stops right after block m
        (a side network that re-runs the last blocks itself does not pay for them twice).
        """
        m = self.num_layers if num_layers is None else num_layers
        if not 1 <= m <= max(1, self.num_layers) and self.layer_specs:
            raise ValueError(f"num_layers={num_layers}: the backbone has {self.num_layers} layers")
        if with_input and self.layer_specs and self.input_spec is None:
            raise ValueError(f"{type(self).__name__}: the input of its first block is not a token sequence (b_0)")
        if isinstance(x, Precomputed):
            return self._from_cache(x, with_input, m)
        self._store.clear()
        self._input, self._want_input = None, with_input
        stop = None
        if self.layer_specs and m < self.num_layers:
            stop = self._block_modules()[m - 1].register_forward_hook(_raise_exit)
        try:
            self._run(x)
        except _EarlyExit:
            pass
        finally:
            self._want_input = False
            if stop is not None:
                stop.remove()
        count = m if self.layer_specs else len(self._hooks)
        missing = [i for i in range(count) if i not in self._store]
        if missing:
            raise RuntimeError(f"{type(self).__name__}: blocks {missing} did not run")
        feats = [self._to_tokens(i, self._store[i]) for i in range(count)]
        self._store.clear()
        if with_input:
            raw, self._input = self._input, None
            if not isinstance(raw, Tensor) or raw.dim() != 3:
                raise RuntimeError(f"{type(self).__name__}: the first block got no token input")
            feats.insert(0, self._input_tokens(raw))
        return feats

    def _from_cache(self, x: Precomputed, with_input: bool, m: int) -> list[Tensor]:
        layers = list(x.layers)
        has_input = len(layers) == self.num_layers + 1
        if with_input and not has_input:
            raise ValueError("the cached features hold no b_0 (input of the first block): rebuild the cache")
        body = layers[1:] if has_input else layers
        return ([layers[0]] if with_input else []) + body[:m]

    def _input_tokens(self, raw: Tensor) -> Tensor:
        """b_0 as `B x N x D` tokens (sequence-first towers are transposed like their layers)."""
        return self._to_tokens(0, raw)

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

    def set_checkpointing(self, choice: bool | str | int | None = True) -> None:
        """Activation checkpointing of the blocks: recompute their activations in backward.

        `choice` (see `checkpoint_segments`): 'none' / False / None, 'all' / True (every block on its
        own), 'every_<k>' or an int k (every k-th block on its own, the others keep their
        activations), 'sqrt' (ceil(sqrt(L)) segments of consecutive blocks, each checkpointed as one).
        """
        segments = checkpoint_segments(choice, len(self._block_modules()))
        if any(len(seg) > 1 for seg in segments):
            segments = _split_at(segments, self._chain_links())
        if segments == self._checkpointing:
            return
        self._apply_checkpointing(segments)

    def _apply_checkpointing(self, segments: list[list[int]]) -> None:
        blocks = self._block_modules()
        for block in blocks:  # undo the previous plan first
            if hasattr(block, "_mdpd_forward"):
                block.forward = block._mdpd_forward  # type: ignore[attr-defined]
                del block._mdpd_forward
        for seg in segments:
            members = [blocks[i] for i in seg]
            for block in members:
                block._mdpd_forward = block.forward  # type: ignore[attr-defined]
            if len(members) == 1:
                members[0].forward = _checkpointed(members[0]._mdpd_forward)  # type: ignore[attr-defined]
                continue
            runner = _SegmentRunner(members)
            for position, block in enumerate(members):
                block.forward = runner.forward_of(position)  # type: ignore[attr-defined]
        self._checkpointing = segments

    def _chain_links(self) -> list[bool]:
        """links[i]: block i + 1 is called on block i's output (a probe pass); a run of blocks can only be
        recomputed as one segment along such links (timm's EfficientNet has conv_head before bn2)."""
        blocks = self._block_modules()
        inputs: dict[int, Any] = {}
        outputs: dict[int, Any] = {}
        hooks = []
        def keep_in(i: int) -> Callable[..., None]:
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                inputs.setdefault(i, _first_tensor(args, kwargs))

            return hook

        def keep_out(i: int) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: Any, out: Any) -> None:
                outputs.setdefault(i, out[0] if isinstance(out, (tuple, list)) else out)

            return hook

        for i, block in enumerate(blocks):
            hooks.append(block.register_forward_pre_hook(keep_in(i), with_kwargs=True))
            hooks.append(block.register_forward_hook(keep_out(i)))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                self._run(self.example_input(1))
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        return [inputs.get(i + 1) is not None and inputs.get(i + 1) is outputs.get(i) for i in range(len(blocks) - 1)]

    @property
    def checkpointing(self) -> list[list[int]]:
        """The checkpointed segments now in force (block indices; [] = no checkpointing)."""
        return [list(s) for s in self._checkpointing] if self._checkpointing else []

    def forward(self, x: Any) -> list[Tensor]:
        return self.features(x)

    # -- helpers for subclasses -----------------------------------------------------------------
    def _setup(self) -> None:
        """Register the hooks and probe the layer shapes with `example_input()`."""
        self._register_hooks()
        was_training = self.training
        self.eval()
        self.layer_specs, self.input_spec = [], None
        with torch.no_grad():
            x = self.example_input(2)
            feats = self.features(x)
            self.layer_specs = [self._layer_spec(i, f) for i, f in enumerate(feats)]
            self.input_spec = self._probe_input_spec(x, feats[0])
        self.train(was_training)

    def _register_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._input_hook is not None:
            self._input_hook.remove()
        blocks = self._block_modules()
        self._hooks = [block.register_forward_hook(self._make_hook(i)) for i, block in enumerate(blocks)]
        if not self._hooks:
            raise ValueError(f"{type(self).__name__} exposes no layers")
        self._input_hook = blocks[0].register_forward_pre_hook(self._keep_input, with_kwargs=True)

    def _keep_input(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._want_input:
            self._input = _first_tensor(args, kwargs)

    def _probe_input_spec(self, x: Any, first: Tensor) -> LayerSpec | None:
        """b_0's layout when the first block's input is a token sequence shaped like b_1."""
        self._store.clear()
        self._input, self._want_input = None, True
        try:
            self._run(x)
        finally:
            self._want_input = False
            self._store.clear()
        raw, self._input = self._input, None
        if not isinstance(raw, Tensor) or raw.dim() != 3:
            return None
        tokens = self._input_tokens(raw)
        if tokens.shape[:2] != first.shape[:2]:
            return None
        spec = self.layer_specs[0]
        return LayerSpec(int(tokens.shape[-1]), spec.grid, spec.prefix)

    def clone(self) -> Backbone:
        """A deep copy with its own layer hooks (a plain deepcopy keeps hooks that fill the original) and
        its own checkpointing plan (deepcopy shares the checkpointed forwards, closures over the
        original's blocks, so the copy would run the original's weights)."""
        plan = self._checkpointing
        self._apply_checkpointing([])
        try:
            dup = copy.deepcopy(self)
        finally:
            self._apply_checkpointing(plan)
        dup._apply_checkpointing(plan)
        for handle in [*dup._hooks, dup._input_hook]:  # the copied handles point at the copied blocks
            if handle is not None:
                handle.remove()
        dup._hooks, dup._input_hook = [], None
        dup._register_hooks()
        return dup

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        """Default: no grid. Image wrappers override to report their patch grid."""
        return LayerSpec(width=tokens.shape[-1])

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
            # keyed by index, so a checkpoint recompute overwrites rather than appends
            self._store[index] = out

        return hook


CHECKPOINT_CHOICES = ("none", "all", "every_2", "every_3", "sqrt")


def checkpoint_segments(choice: bool | str | int | None, num_blocks: int) -> list[list[int]]:
    """The segments a checkpointing choice makes of `num_blocks` blocks (block indices, shallow first).

    - 'none', False, None: no segment;
    - 'all', True, 1: every block is a segment of its own (stores each block's input, recomputes the
      whole forward once in backward);
    - 'every_<k>' or an int k >= 2: blocks 0, k, 2k, ... are segments of their own; the other blocks
      keep their activations (recomputes about 1/k of the forward, keeps about 1 - 1/k of the bytes);
    - 'sqrt': ceil(sqrt(L)) runs of consecutive blocks, each checkpointed as one (Chen et al. 2016:
      stores only the runs' inputs; backward recomputes one run at a time).
    A string that is none of these raises ValueError naming the choices.
    """
    if choice is None or choice is False or choice == "none":
        return []
    if choice is True or choice == "all":
        return [[i] for i in range(num_blocks)]
    if choice == "sqrt":
        size = max(1, math.ceil(math.sqrt(num_blocks)))
        return [list(range(i, min(i + size, num_blocks))) for i in range(0, num_blocks, size)]
    k = checkpoint_stride(choice)
    if k is None:
        raise ValueError(
            f"unknown checkpointing {choice!r}; valid: {', '.join(CHECKPOINT_CHOICES)}, every_<k>, "
            "an integer k >= 1, true or false"
        )
    return [[i] for i in range(0, num_blocks, k)]


def checkpoint_stride(choice: Any) -> int | None:
    """k of 'every_<k>' or of an int k >= 1; None for anything else."""
    if isinstance(choice, bool):
        return None
    if isinstance(choice, int):
        return choice if choice >= 1 else None
    if isinstance(choice, str) and choice.startswith("every_") and choice[6:].isdigit():
        k = int(choice[6:])
        return k if k >= 1 else None
    return None


def _split_at(segments: list[list[int]], links: list[bool]) -> list[list[int]]:
    """Cut every segment where block i + 1 does not take block i's output (`links[i]` False)."""
    out: list[list[int]] = []
    for seg in segments:
        run = [seg[0]]
        for i in seg[1:]:
            if links[i - 1]:
                run.append(i)
            else:
                out.append(run)
                run = [i]
        out.append(run)
    return out


def _checkpointed(fn: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    return forward


def _with_first_tensor(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    """(args, kwargs) with the hidden states (see `_first_tensor`) replaced by `new`."""
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return args, {**kwargs, "hidden_states": new}
    for i, value in enumerate(args):
        if isinstance(value, Tensor):
            return (*args[:i], new, *args[i + 1 :]), kwargs
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return args, {**kwargs, key: new}
    return args, kwargs


def _extras(args: tuple, kwargs: dict) -> list[Any]:
    """Every argument but the hidden states, to check that a block is called like its segment's first."""
    hidden = _first_tensor(args, kwargs)
    return [v for v in (*args, *kwargs.items()) if v is not hidden and not (isinstance(v, tuple) and v[1] is hidden)]


def _same_extras(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple):  # keyword items
            if x[0] != y[0] or not _same_extras([x[1]], [y[1]]):
                return False
        elif isinstance(x, Tensor) or isinstance(y, Tensor):
            if x is not y:
                return False
        elif x != y:
            return False
    return True


class _SegmentRunner:
    """Consecutive blocks checkpointed as ONE segment, although the wrapped model calls them one by one.

    The first block's call runs every member (their own forwards, so no hook fires inside) in one
    non-reentrant `checkpoint` that returns all the members' outputs; the following calls return
    those outputs in turn, so the model's loop and the layer hooks see exactly what they would see
    without checkpointing. A later member called with another input or other arguments than the
    segment assumed (a model that passes per-layer arguments) simply runs on its own, uncheckpointed.
    """

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self._outputs: list[Any] = []
        self._call: tuple[tuple, dict] | None = None

    def _run(self, args: tuple, kwargs: dict) -> tuple:
        outs = []
        for block in self.members:
            out = block._mdpd_forward(*args, **kwargs)  # type: ignore[attr-defined]
            outs.append(out)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            args, kwargs = _with_first_tensor(args, kwargs, hidden)
        return tuple(outs)

    def forward_of(self, position: int) -> Callable[..., Any]:
        block = self.members[position]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return block._mdpd_forward(*args, **kwargs)  # type: ignore[attr-defined]
            if position == 0:
                self._call = (args, kwargs)
                # non-reentrant checkpointing recomputes from the saved-tensor hooks, so the call's
                # tensors may travel inside the closure's arguments
                self._outputs = list(checkpoint(self._run, args, kwargs, use_reentrant=False))
                return self._outputs[0]
            expected = self._outputs[position - 1] if len(self._outputs) >= position else None
            hidden = _first_tensor(args, kwargs)
            prev = expected[0] if isinstance(expected, (tuple, list)) else expected
            first = self._call
            if prev is None or hidden is not prev or first is None or not _same_extras(
                _extras(args, kwargs), _extras(*first)
            ):
                self._outputs = []
                return block._mdpd_forward(*args, **kwargs)  # type: ignore[attr-defined]
            out = self._outputs[position]
            if position == len(self.members) - 1:
                self._outputs, self._call = [], None
            return out

        return forward


def grid_from_map(shape: Sequence[int]) -> tuple[int, int]:
    """(H, W) of a `B x C x H x W` map."""
    return (int(shape[-2]), int(shape[-1]))
