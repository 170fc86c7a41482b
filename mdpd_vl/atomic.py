"""Writes that lose nothing, and output paths checked before any work starts.

Every file the project writes (checkpoints, exports, indexes, results, cards, configs) goes through
this module:
- a file is written to a hidden temp file in its own folder (`.<name>.<pid>.<token>.tmp`), flushed,
  fsynced and renamed into place, so a reader never sees half a file; the temp file is created with
  mode 0666 and the process umask applies, like any other new file (not 0600 as `mkstemp` makes it);
- a failed write (full disk, quota, read-only disk, any `OSError`) removes its temp file and raises
  one `WriteError` line naming the path, the bytes the write needed and the bytes free;
- temp files left by a killed process (its pid no longer runs) are removed by the next write into
  the same folder, so a kill during a write leaves nothing behind once a later run succeeds.
`check_paths` proves, before any work, that output folders and files can exist where they are named
(no part of the path is a regular file). See README "Under faults".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from mdpd_vl.errors import UserError

__all__ = [
    "WriteError",
    "check_dir",
    "check_file",
    "check_paths",
    "clean_stale",
    "free_bytes",
    "fsync_dir",
    "guard_writes",
    "temp_path",
    "tensor_bytes",
    "write_bytes",
    "write_files",
    "write_text",
    "write_with",
]

F = TypeVar("F", bound=Callable[..., Any])
_CHUNK = 1 << 20
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


class WriteError(UserError):
    """A write that failed (no space, quota, permissions, ...); nothing half-written was left.
    `errno` is the OS error number, `needed` the bytes the write needed (None when unknown)."""

    def __init__(self, message: str, *, where: str, errno_: int | None = None, needed: int | None = None):
        super().__init__(message, where=where)
        self.errno, self.needed = errno_, needed


# ----------------------------------------------------------------------------- facts about disks


def _existing(path: Path) -> Path:
    """The nearest existing folder at or above `path`."""
    for p in (path, *path.parents):
        if p.is_dir():
            return p
    return Path(".")


def free_bytes(path: str | Path) -> int | None:
    """Bytes free for an unprivileged writer on the disk that holds `path` (None when unknown)."""
    try:
        return shutil.disk_usage(_existing(Path(path).absolute())).free
    except OSError:
        return None


_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(err: OSError, path: str | Path, needed: int | None, *, at_least: bool = False) -> WriteError:
    """The one line for a failed write of `path`: the OS reason and, when space ran out, the bytes
    the write needed and the bytes free."""
    reason = err.strerror or type(err).__name__
    parts = [f"cannot write ({reason})"]
    if err.errno in _SPACE:
        if needed:
            parts.append(f"it needs {'at least ' if at_least else ''}{needed:,} bytes")
        free = free_bytes(path)
        if free is not None:
            parts.append(f"{free:,} bytes free there")
        parts.append("free some space and run again")
    return WriteError("; ".join(parts), where=str(path), errno_=err.errno, needed=needed)


# ----------------------------------------------------------------------------- temp files


def temp_path(path: str | Path) -> Path:
    """A fresh hidden temp name next to `path`, recognised by `clean_stale` once its process is gone."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's live process (or an absurd pid): leave its file alone
    return True


def clean_stale(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove the temp files (and temp folders) that writers killed before finishing left in `folder`
    (for target `name` only, when given); returns what was removed. Live writers' files are kept."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m.group("name") != name) or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _open_new(path: Path) -> BinaryIO:
    # O_EXCL + mode 0666: the umask decides the final mode, as for any file `open()` creates
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    return os.fdopen(fd, "wb")


def _write_chunks(fh: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start : start + _CHUNK])


# ----------------------------------------------------------------------------- atomic writes


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (str: UTF-8) to `path` atomically: all of it or, on failure, nothing (the old file
    stays). Raises `WriteError` naming the path and the bytes needed."""
    path = Path(path)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp: Path | None = None
    try:
        clean_stale(path.parent, path.name)
        tmp = temp_path(path)
        with _open_new(tmp) as fh:
            _write_chunks(fh, blob)
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise write_error(err, path, len(blob)) from None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`write_bytes` for text (UTF-8)."""
    return write_bytes(path, text)


def write_with(path: str | Path, writer: Callable[[str], Any], size_hint: int | None = None) -> Path:
    """Atomic write by a library that writes to a file name itself (`writer(tmp_name)`, e.g.
    safetensors' `save_model`). On failure the temp file goes, and the error names the bytes needed:
    `size_hint` when given, else at least what had been written when the disk refused more."""
    path = Path(path)
    tmp: Path | None = None
    try:
        clean_stale(path.parent, path.name)
        tmp = temp_path(path)
        _open_new(tmp).close()  # reserve the name with the umask's mode; the writer truncates it
        try:
            writer(str(tmp))
        except Exception as err:  # a library's own I/O error type (safetensors: "os error 28")
            raise _os_error(err) from err
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _replace(tmp, path)
    except OSError as err:
        written = 0
        if tmp is not None:
            with contextlib.suppress(OSError):
                written = tmp.stat().st_size
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise write_error(err, path, size_hint or written, at_least=size_hint is None) from None
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    return path


_OS_ERROR = re.compile(r"os error (\d+)")


def _os_error(err: Exception) -> Exception:
    """`err` as the OSError it reports when a library wraps one in its own type (Rust I/O errors
    read "... (os error 28)"), else `err` itself."""
    if isinstance(err, OSError):
        return err
    m = _OS_ERROR.search(str(err))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else err


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors a safetensors file of `obj` (an `nn.Module` or a name -> tensor mapping)
    holds: the `size_hint` of `write_with` for such a file (its small JSON header aside)."""
    tensors = obj.state_dict().values() if hasattr(obj, "state_dict") else obj.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def write_files(folder: str | Path, files: Mapping[str, bytes | str]) -> None:
    """Write several files into `folder` all or nothing: every one to a temp file first, then all
    renamed. A failure while writing leaves every previous file untouched and no temp file."""
    folder = Path(folder)
    blobs = {name: d.encode("utf-8") if isinstance(d, str) else d for name, d in files.items()}
    needed = sum(len(b) for b in blobs.values())
    staged: list[tuple[Path, Path]] = []
    current = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, blob in blobs.items():
            current = folder / name
            clean_stale(folder, name)
            tmp = temp_path(current)
            staged.append((tmp, current))
            with _open_new(tmp) as fh:
                _write_chunks(fh, blob)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, dest in staged:
            current = dest
            os.replace(tmp, dest)
        fsync_dir(folder)
    except OSError as err:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise write_error(err, current, needed) from None
    except BaseException:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def guard_writes(cleanup: Callable[..., Iterable[Path]]) -> Callable[[F], F]:
    """Decorator for a function that writes many files (e.g. a generated dataset): an `OSError` it
    raises becomes one `WriteError` naming the file, and the folders `cleanup(*args, **kwargs)`
    names are removed, so nothing half-written stays."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except OSError as err:
                written = 0
                for folder in cleanup(*args, **kwargs):
                    written += _tree_bytes(folder)
                    with contextlib.suppress(OSError):
                        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
                where = err.filename or next(iter(cleanup(*args, **kwargs)), ".")
                raise write_error(err, where, written or None, at_least=True) from None

        return inner  # type: ignore[return-value]

    return wrap


def _tree_bytes(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for dirpath, _, names in os.walk(folder):
            for n in names:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(dirpath, n)).st_size
    return total


# ----------------------------------------------------------------------------- paths, checked early


def _first_non_dir(path: Path) -> Path | None:
    """The first existing component of `path` (itself included) that is not a folder, else None."""
    for p in reversed((path, *path.parents)):
        if p.exists() and not p.is_dir():
            return p
    return None


def check_dir(path: str | Path, flag: str, *, write: bool = True) -> Path:
    """A folder the run will create or read: no part of `path` may be a regular file, and (`write`)
    the nearest existing folder must be writable. One UserError naming `flag` otherwise."""
    path = Path(path).expanduser()
    blocker = _first_non_dir(path.absolute())
    if blocker is not None:
        what = "is a regular file" if blocker == path.absolute() else f"is under the regular file {blocker}"
        raise UserError(f"{what}, not a folder; name a folder", where=str(path), field=flag)
    if write:
        base = _existing(path.absolute())
        if not os.access(base, os.W_OK | os.X_OK):
            raise UserError(f"cannot create or write here ({base} is not writable)", where=str(path), field=flag)
    return path


def check_file(path: str | Path, flag: str) -> Path:
    """A file the run will write: not a folder, and its folder passes `check_dir`."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError("is a folder; name a file", where=str(path), field=flag)
    blocker = _first_non_dir(path.parent.absolute())
    if blocker is not None:
        raise UserError(f"is under the regular file {blocker}; name a file in a folder", where=str(path), field=flag)
    check_dir(path.parent, flag)
    return path


def check_paths(out_dirs: Mapping[str, Any] | None = None, in_dirs: Mapping[str, Any] | None = None,
                out_files: Mapping[str, Any] | None = None) -> None:
    """Check every named path before any work: `{flag: path}` for folders the run writes (`out_dirs`),
    folders it only reads (`in_dirs`, which must not lie under a file) and files it writes
    (`out_files`). None values are skipped."""
    for flag, p in (out_dirs or {}).items():
        if p is not None:
            check_dir(p, flag)
    for flag, p in (in_dirs or {}).items():
        if p is not None:
            check_dir(p, flag, write=False)
    for flag, p in (out_files or {}).items():
        if p is not None:
            check_file(p, flag)
