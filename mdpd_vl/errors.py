"""User-facing errors: one line, naming the file and the field, exit status 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A mistake in what the user handed us (file, field, option). Printed as one line, exit 2."""

    def __init__(self, message: str, *, where: str | None = None, field: str | None = None):
        parts = [p for p in (where, field) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.where, self.field = where, field


def cli_entry(fn: F) -> F:
    """Wrap a CLI `main`: a UserError becomes `error: <line>` on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
