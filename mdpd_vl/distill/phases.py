"""Named phases of a training step, for profilers (`python -m mdpd_vl.bench --profile mdpd`).

`phase(name)` marks a region of the step ('backbone', 'side', 'phi', 'G', 'losses', ...). It does
nothing unless a recorder is installed with `recording(recorder)`: then the recorder's
`enter(name)` / `exit(name)` run at the region's edges (a recorder times the region and reads the
live bytes there). Regions may nest and repeat (phi runs once per layer); the recorder decides how
to add them up. The context variable keeps recorders of different threads apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol


class PhaseRecorder(Protocol):
    def enter(self, name: str) -> None: ...

    def exit(self, name: str) -> None: ...


_RECORDER: ContextVar[PhaseRecorder | None] = ContextVar("mdpd_phase_recorder", default=None)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the enclosed code as phase `name` for the installed recorder (none: a no-op)."""
    recorder = _RECORDER.get()
    if recorder is None:
        yield
        return
    recorder.enter(name)
    try:
        yield
    finally:
        recorder.exit(name)


@contextlib.contextmanager
def recording(recorder: PhaseRecorder) -> Iterator[PhaseRecorder]:
    """Install `recorder` for the enclosed code."""
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)
