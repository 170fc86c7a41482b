"""Faults of the one writer every file of the project goes through (mdpd_vl/atomic.py): full disk,
a kill in the middle, the umask, paths under a regular file."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from faults_helpers import env, no_space, temp_files

from mdpd_vl import atomic
from mdpd_vl.errors import UserError

WRITERS = {
    "write_bytes": lambda p, data: atomic.write_bytes(p, data),
    "write_text": lambda p, data: atomic.write_text(p, data.decode()),
    "write_with": lambda p, data: atomic.write_with(p, lambda tmp: Path(tmp).write_bytes(data)),
    "write_files": lambda p, data: atomic.write_files(p.parent, {p.name: data}),
    "config.atomic_write_text": lambda p, data: __import__(
        "mdpd_vl.engine.config", fromlist=["x"]).atomic_write_text(p, data.decode()),
    "cards.write_model_card": lambda p, data: __import__(
        "mdpd_vl.cards", fromlist=["x"]).write_model_card(p, {}, template=_template(p, data)),
}


def _template(p: Path, data: bytes) -> Path:
    t = p.parent.parent / "template.md"
    t.write_bytes(data)
    return t


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_new_files_honour_the_umask(folder: Path, writer: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        WRITERS[writer](folder / "f.txt", b"hello\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((folder / "f.txt").stat().st_mode) == 0o666 & ~umask  # not 0600 whatever the umask
    assert temp_files(folder) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_full_disk_is_one_line_and_keeps_the_old_file(folder: Path, writer: str, monkeypatch) -> None:
    target = folder / "f.txt"
    WRITERS[writer](target, b"old content\n")
    if writer == "write_with":  # the library writes itself: its write fails as on a full disk
        def lib(tmp: str) -> None:
            Path(tmp).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
        with pytest.raises(atomic.WriteError) as info:
            atomic.write_with(target, lib)
        assert "at least 4 bytes" in str(info.value)
    else:
        refused = no_space(monkeypatch, "f.txt", after=3)
        with pytest.raises(atomic.WriteError) as info:
            WRITERS[writer](target, b"x" * 5000 + b"\n")
        assert refused and "5,001 bytes" in str(info.value)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith(f"{target}: cannot write (No space left on device)") and "bytes free" in message
    assert target.read_bytes() == b"old content\n"  # nothing half-written
    assert temp_files(folder) == []


def test_write_files_is_all_or_nothing_under_a_full_disk(folder: Path, monkeypatch) -> None:
    atomic.write_files(folder, {"a.json": "1", "b.json": "1"})
    no_space(monkeypatch, "b.json")
    with pytest.raises(atomic.WriteError, match=r"b\.json: cannot write .* it needs 2 bytes"):
        atomic.write_files(folder, {"a.json": "2", "b.json": "2"})
    assert (folder / "a.json").read_text() == "1" and (folder / "b.json").read_text() == "1"
    assert temp_files(folder) == []


def test_a_real_size_limit_fails_the_same_way(folder: Path) -> None:
    # RLIMIT_FSIZE: the kernel refuses the bytes (EFBIG), as a tiny file system would (no root needed)
    code = ("import resource, signal, sys; from mdpd_vl import atomic\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "from mdpd_vl.errors import cli_entry\n"
            f"cli_entry(lambda: atomic.write_bytes({str(folder / 'big.bin')!r}, b'x' * 100000))()\n")
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "big.bin: cannot write (File too large); it needs 100,000 bytes" in done.stderr
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("writer", ["write_bytes", "write_with", "write_files"])
def test_killed_writer_leaves_the_old_file_and_the_next_write_cleans_up(folder: Path, writer: str) -> None:
    target = folder / "f.txt"
    atomic.write_bytes(target, b"old\n")
    call = {"write_bytes": "atomic.write_bytes(p, b'new' * 1000)",
            "write_with": "atomic.write_with(p, lambda t: open(t, 'wb').write(b'new' * 1000))",
            "write_files": "atomic.write_files(p.parent, {p.name: b'new' * 1000})"}[writer]
    code = ("import os, signal; from pathlib import Path; from mdpd_vl import atomic\n"
            "os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)\n"
            f"p = Path({str(target)!r}); {call}\n")
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, timeout=60)
    assert done.returncode == -9
    left = temp_files(folder)
    assert len(left) == 1 and target.read_bytes() == b"old\n"  # the kill left a temp file, the old file intact
    WRITERS[writer](target, b"good\n")
    assert target.read_bytes() == b"good\n" and temp_files(folder) == []  # the next write removed it


def test_live_writers_temp_files_are_kept(folder: Path) -> None:
    live = folder / f".f.txt.{os.getppid()}.0123abcd.tmp"  # a running process (our parent) owns it
    live.write_bytes(b"in progress")
    dead = folder / ".f.txt.999999999.0123abcd.tmp"
    dead.write_bytes(b"left by a kill")
    foreign = folder / ".f.txt.swp"
    foreign.write_bytes(b"not ours")
    atomic.write_bytes(folder / "f.txt", b"x")
    assert live.exists() and foreign.exists() and not dead.exists()


@pytest.mark.parametrize("kind", ["out_dirs", "in_dirs", "out_files"])
@pytest.mark.parametrize("depth", ["is", "under", "deep under"])
def test_paths_under_a_regular_file_fail_before_any_work(tmp_path: Path, kind: str, depth: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = {"is": blocker, "under": blocker / "x", "deep under": blocker / "x" / "y" / "z"}[depth]
    if kind == "out_files" and depth == "is":
        atomic.check_paths(out_files={"--out": path})  # overwriting a file is fine
        return
    with pytest.raises(UserError) as info:
        atomic.check_paths(**{kind: {"--flag": path}})
    message = str(info.value)
    assert message.startswith(f"{path}: --flag: ") and "regular file" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing created


def test_a_folder_named_as_output_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r": --out: is a folder; name a file$"):
        atomic.check_paths(out_files={"--out": tmp_path})


def test_guard_writes_removes_the_partial_output(tmp_path: Path) -> None:
    @atomic.guard_writes(lambda root: [root / "partial"])
    def build(root: Path) -> None:
        (root / "partial").mkdir()
        (root / "partial" / "a.bin").write_bytes(b"x" * 300)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / "partial" / "b.bin"))

    with pytest.raises(atomic.WriteError, match=r"b\.bin: cannot write \(No space left on device\); it needs at "
                                                r"least 300 bytes"):
        build(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_library_writer_that_wraps_the_os_error_is_one_line_too(folder: Path) -> None:
    # safetensors reports a refused write as SafetensorError("... (os error 27)"), not as an OSError
    code = ("import resource, signal, torch; from safetensors.torch import save_file; from mdpd_vl import atomic\n"
            "from mdpd_vl.errors import cli_entry\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
            "t = {'w': torch.zeros(10000)}\n"
            f"cli_entry(lambda: atomic.write_with({str(folder / 'w.safetensors')!r}, lambda tmp: save_file(t, tmp),"
            " atomic.tensor_bytes(t)))()\n")
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "w.safetensors: cannot write (File too large); it needs 40,000 bytes" in done.stderr
    assert list(folder.iterdir()) == []
