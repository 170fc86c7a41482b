"""Re-running frozen backbone modules standalone (SHERL's late route), and the calling conventions.

`BlockRunner` calls the class `forward` of each module with detached parameters and copied buffers
(`torch.func.functional_call`), so no backbone tensor gets a gradient or changes (a BatchNorm in
train mode cannot update the backbone's running statistics), while gradients still flow to the
input. It understands open_clip resblocks (NLD or LND, causal mask of text towers), transformers
layers (additive padding mask, causal for decoders / CLIP text; tuple or tensor output), conv
modules (tokens <-> maps via the input layout's grid, maps kept between consecutive conv modules)
and anything else called on tokens. A backbone wrapper may set `causal = True/False`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mdpd_vl.backbones.base import LayerSpec


class _Direct(nn.Module):
    """Calls the class `forward` of a module: skips instance hooks/patches (backbone feature hooks,
    activation checkpointing) so re-running a module never touches the backbone's state."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: object, **kwargs: object) -> object:
        return type(self.block).forward(self.block, *args, **kwargs)


def block_family(block: nn.Module) -> str:
    """Calling convention of a backbone module: 'open_clip', 'hf', 'map' (conv) or 'tokens'."""
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


def is_causal(backbone: nn.Module | None) -> bool:
    """True for causal text towers (open_clip / CLIP text): their class token is the last valid one."""
    if backbone is None:
        return False
    flag = getattr(backbone, "causal", None)
    if flag is not None:
        return bool(flag)
    blocks = list(getattr(backbone, "blocks", []) or [])
    if not blocks:
        return False
    family = block_family(blocks[-1])
    if family == "open_clip":
        return _open_clip_causal(backbone, blocks[-1]) is not None
    return family == "hf" and _hf_causal(blocks[-1])


def _causal_additive(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


class BlockRunner:
    """Re-runs backbone modules in order on tokens `B x N x D` (layout `in_spec`).

    `run(x, mask)` returns the tokens after every module whose position is in `marks` (default:
    after each module); `runner(x, mask)` returns the last output.
    """

    def __init__(self, blocks: list[nn.Module], in_spec: LayerSpec, backbone: nn.Module,
                 marks: Iterable[int] | None = None):
        self.blocks = [_Direct(b) for b in blocks]
        self.families = [block_family(b) for b in blocks]
        self.in_spec = in_spec
        self.marks = set(range(len(blocks))) if marks is None else set(marks)
        flag = getattr(backbone, "causal", None)
        self.causal: list[Tensor | bool | None] = []
        for block, family in zip(blocks, self.families):
            if family == "open_clip":
                found = _open_clip_causal(backbone, block)
                self.causal.append(found if found is not None else (True if flag else None))
            else:
                self.causal.append(bool(flag) if flag is not None else family == "hf" and _hf_causal(block))

    def _call(self, direct: _Direct, *args: object, **kwargs: object) -> Tensor:
        block = direct.block
        state = {f"block.{n}": p.detach() for n, p in block.named_parameters()}
        # copies, so a BatchNorm in train mode cannot update the backbone's running statistics
        state.update({f"block.{n}": b.clone() for n, b in block.named_buffers()})
        out = functional_call(direct, state, args, kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        assert isinstance(out, Tensor)
        return out

    def __call__(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.run(x, mask, marks={len(self.blocks) - 1})[-1]

    def run(self, x: Tensor, mask: Tensor | None, marks: set[int] | None = None) -> list[Tensor]:
        marks = self.marks if marks is None else marks
        outs: list[Tensor] = []
        state = x
        for i, (direct, family, causal) in enumerate(zip(self.blocks, self.families, self.causal)):
            if family == "map":
                if state.dim() == 3:
                    state = self._to_map(state)
                state = self._call(direct, state)
            else:
                state = _tokens(state)
                n = state.shape[1]
                valid = mask if mask is not None and mask.shape[1] == n else None
                state = self._run_tokens(direct, family, causal, state, valid)
            if i in marks:
                outs.append(_tokens(state))
        return outs

    def _to_map(self, x: Tensor) -> Tensor:
        if self.in_spec.prefix:
            raise ValueError("a conv module cannot take prefix tokens")
        h, w = self.in_spec.grid_for(x.shape[1]) or (x.shape[1], 1)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)

    def _run_tokens(self, direct: _Direct, family: str, causal: Tensor | bool | None, x: Tensor,
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
            return out if batch_first else out.transpose(0, 1)
        if family == "hf":
            add = None
            if mask is not None:
                add = (~mask.bool())[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
            if causal:
                causal_add = _causal_additive(n, x.dtype, x.device)[None, None]
                add = causal_add if add is None else torch.minimum(add, causal_add)  # min avoids -inf
            return self._call(direct, x, attention_mask=add)
        return _tokens(self._call(direct, x))


def call_order(model: nn.Module, run: object) -> list[tuple[str, nn.Module]]:
    """('start'|'end', module) events of every module under `model` during `run()` (a probe)."""
    events: list[tuple[str, nn.Module]] = []
    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(lambda m, _a: events.append(("start", m))))
        handles.append(module.register_forward_hook(lambda m, _a, _o: events.append(("end", m))))
    try:
        run()  # type: ignore[operator]
    finally:
        for h in handles:
            h.remove()
    return events


def modules_between(events: list[tuple[str, nn.Module]], first: nn.Module, second: nn.Module) -> list[nn.Module]:
    """The outermost modules that start and end after `first` ends and before `second` starts."""
    def index(kind: str, module: nn.Module) -> int:
        return next(i for i, (k, m) in enumerate(events) if k == kind and m is module)

    lo, hi = index("end", first), index("start", second)
    out: list[nn.Module] = []
    i = lo + 1
    while i < hi:
        kind, module = events[i]
        if kind == "start":
            end = next((j for j in range(i + 1, len(events)) if events[j] == ("end", module)), len(events))
            if end < hi:
                out.append(module)
                i = end
        i += 1
    return out
