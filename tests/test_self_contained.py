"""The project is self-contained: no file of it (prose in .md aside) refers to a path outside its own tree.

A user has a clone of the project and nothing else, so code, configs, tests and scripts may not
climb out of it (`..` then a name), reach a sibling folder of the checkout, or name a machine folder.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", "data", "runs", "outputs", "cache", "build", "dist", "__pycache__", ".pytest_cache",
             ".ruff_cache"}

# a relative path climbing out (`..` then a name), the old shared checkout by name, machine folders
CLIMB = re.compile(r"\.\./[A-Za-z_]")
SHARED = re.compile(r"\bshared" r"/(fixtures|spec|seeds|DESIGN)")
MACHINE = re.compile(r"(?<![\w.])/(work|home|Users|root|mnt|scratch|srv|opt)/")
# Path(__file__)[.resolve()] followed by .parent chains or .parents[k]
FROM_FILE = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent\b)+|\.parents\[(\d+)\])")
ROOT_PARENT = re.compile(r"\b(ROOT|REPO)\.parent\b")


def project_files() -> list[Path]:
    """Tracked files (git), or every file outside build / data folders when there is no git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60)
        names = [n for n in out.stdout.decode().split("\0") if n]
        if names:
            return [ROOT / n for n in names if (ROOT / n).is_file()]
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        files += [Path(folder) / n for n in names]
    return files


def outside_references(text: str, rel: Path) -> list[str]:
    """Lines of `text` (the file `rel`, relative to the root) that point outside the project."""
    depth = len(rel.parts)  # tests/x.py: 2, so Path(__file__).parents[1] is the root
    bad = []
    for n, line in enumerate(text.splitlines(), 1):
        hits = [rx.search(line) for rx in (CLIMB, SHARED, MACHINE, ROOT_PARENT)]
        for m in FROM_FILE.finditer(line):
            levels = int(m.group(2)) + 1 if m.group(2) is not None else m.group(1).count(".parent")
            hits.append(m if levels > depth else None)
        if any(hits):
            bad.append(f"{rel}:{n}: {line.strip()}")
    return bad


def test_no_project_file_refers_outside_the_repository() -> None:
    bad = []
    for path in project_files():
        rel = path.relative_to(ROOT)
        if path.suffix == ".md":
            continue  # prose may mention other places; nothing reads it
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (png, fixtures are text)
        bad += outside_references(text, rel)
    assert not bad, "paths outside the repository:\n" + "\n".join(bad)


def test_the_checker_catches_each_kind_of_outside_path() -> None:
    rel = Path("tests/test_x.py")
    planted = {  # split literals, so that this file itself passes the check
        "REAL = ROOT" ".parent / 'shared' / 'fixtures'": True,
        "p = Path(__file__).resolve()" ".parents[2] / 'x'": True,
        "p = Path(__file__)" ".parent.parent.parent": True,
        "open('.." "/shared" "/fixtures/real/a.csv')": True,
        "open('/work" "/main/x')": True,
        "ROOT = Path(__file__).resolve().parents[1]": False,
        "p = Path(__file__).parent / 'fixtures' / 'real'": False,
        "return name.startswith(('/', './', '../', '~'))": False,
    }
    for line, outside in planted.items():
        assert bool(outside_references(line, rel)) is outside, line


def test_the_real_fixtures_live_in_the_project() -> None:
    from prep_helpers import REAL

    assert REAL.resolve().is_relative_to(ROOT)
    table = (REAL / "README.md").read_text()
    for name in sorted(p.name for p in REAL.iterdir() if p.name != "README.md"):
        pattern = re.sub(r"_(train|val|test)_", "_{train,val,test}_", name)  # msvd_{train,val,test}_list.txt
        assert name in table or pattern in table, f"{name} has no provenance row in {REAL / 'README.md'}"
