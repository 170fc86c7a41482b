"""Work that happens once per optimiser step, not once per forward (alternate phases, EMA, AdaLoRA).

A training step may hold several micro-batches (gradient accumulation), so a model cannot count
its own forwards. Instead an owner registers here; after every `optimizer.step()` of ANY torch
optimizer (the engine's loop, the benchmark's meter, a user's own loop) that holds one of the
owner's `watched_parameters()`, the owner's `after_optimizer_step()` runs: after the update and
before `zero_grad`, so gradients are still there (AdaLoRA's importance scores need them). One
global post-step hook serves every owner; owners are held weakly and vanish with their model.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

from torch import nn
from torch.optim.optimizer import Optimizer, register_optimizer_step_post_hook

_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()
_HANDLE: Any = None


class StepOwner(Protocol):
    def watched_parameters(self) -> list[nn.Parameter]: ...

    def after_optimizer_step(self) -> None: ...


def watch_optimizer_steps(owner: StepOwner) -> None:
    """Call `owner.after_optimizer_step()` after each step of an optimizer holding its parameters."""
    global _HANDLE
    if _HANDLE is None:
        _HANDLE = register_optimizer_step_post_hook(_after_step)
    _OWNERS.add(owner)


def _after_step(optimizer: Optimizer, _args: Any, _kwargs: Any) -> None:
    if not _OWNERS:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for owner in list(_OWNERS):
        if any(id(p) in held for p in owner.watched_parameters()):
            owner.after_optimizer_step()
