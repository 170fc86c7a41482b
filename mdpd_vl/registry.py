"""Explicit registries: plain dicts, duplicates rejected, no import-time magic."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from mdpd_vl.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping from string keys to builders. `get` of an unknown key lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Add `item` under `name`; registering the same name twice is a programming error."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str, *, field: str | None = None) -> T:
        """Look `name` up; unknown names raise a UserError listing the valid ones."""
        if name not in self._items:
            valid = ", ".join(sorted(self._items))
            raise UserError(f"unknown {self.kind} {name!r}; valid: {valid}", field=field)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
