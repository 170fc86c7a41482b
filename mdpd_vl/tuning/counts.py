"""Parameter counting: every tensor counted once, however many modules share it."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


def unique_params(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """`params` without repeats (by identity), order kept."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_params(params: Iterable[Tensor]) -> int:
    """Number of scalars in `params`, each tensor counted once."""
    return sum(p.numel() for p in unique_params(params))  # type: ignore[arg-type]


def count_module(module: nn.Module) -> int:
    """Number of scalars in the parameters of `module`."""
    return count_params(module.parameters())
