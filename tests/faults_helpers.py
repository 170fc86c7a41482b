"""Shared pieces of the fault-injection suite (tests/test_faults_*.py): the assertion that matters
(exit status 2, one `error:` line naming the file, no traceback), temp-file hunting, injected ENOSPC,
and child processes killed or starved of disk by `tests/_faults_worker.py`."""

from __future__ import annotations

import errno
import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_faults_worker.py")
# what a writer of the project leaves while it works: atomic temp files, checkpoint temp folders
TEMP_GLOBS = (".*.tmp", ".tmp-step-*", ".old-step-*", "*.partial")


def error_line(err: str, *names: str) -> str:
    """The single `error:` line of a CLI's stderr; asserts no traceback and that it names `names`."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    """Every temp file or folder a writer left anywhere under `folder`."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if any(fnmatch.fnmatch(p.name, g) for g in TEMP_GLOBS))


def tree(folder: Path) -> dict[str, bytes]:
    """Relative path -> content of every file under `folder` (to prove nothing changed)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_space(monkeypatch: pytest.MonkeyPatch, name_glob: str = "*", after: int = 0) -> list[str]:
    """Make every atomic write into a file whose (final) name matches `name_glob` fail with ENOSPC after
    `after` bytes, as a full disk does; returns the list of paths that were refused."""
    from mdpd_vl import atomic

    real = atomic._write_chunks
    refused: list[str] = []

    def full(fh, data):  # noqa: ANN001 - mirrors atomic._write_chunks
        name = fh.name if isinstance(fh.name, str) else os.readlink(f"/proc/self/fd/{fh.fileno()}")
        target = Path(name).name
        temp = atomic._TEMP.match(target)
        if fnmatch.fnmatch(temp.group("name") if temp else target, name_glob):
            refused.append(name)
            real(fh, bytes(data)[:after])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        real(fh, data)

    monkeypatch.setattr(atomic, "_write_chunks", full)
    return refused


def env() -> dict[str, str]:
    """The environment of child processes: this worktree first on the path, one thread."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_faulty(target: list[str], args: list[str], *, kill_fsync: str | None = None, kill_call: str | None = None,
               fsize: int | None = None, cwd: Path | None = None, timeout: int = 300,
               user_errors: bool = False) -> subprocess.CompletedProcess:
    """Run `--module NAME` / `--script PATH` with `args` in a child process, with the fault injected."""
    cmd = [sys.executable, str(WORKER)]
    if kill_fsync:
        cmd += ["--kill-fsync", kill_fsync]
    if kill_call:
        cmd += ["--kill-call", kill_call]
    if fsize is not None:
        cmd += ["--fsize", str(fsize)]
    if user_errors:
        cmd.append("--user-errors")
    cmd += [*target, "--", *args]
    return subprocess.run(cmd, env=env(), cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def killed(done: subprocess.CompletedProcess) -> bool:
    """True when the child died of the injected SIGKILL."""
    return done.returncode == -9 and "KILLED" in done.stderr
