"""README opens with exactly two commands; `.ci/run` runs both verbatim, in order, the way a newcomer
does (a clone of the committed HEAD in an empty temporary folder, a fresh venv), and times each."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci" / "run"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md must open with a code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def ci_commands() -> list[str]:
    """The entries of `.ci/run`'s README_COMMANDS array (single-quoted, one per line)."""
    text = CI.read_text()
    array = re.search(r"^README_COMMANDS=\(\n(.*?)^\)", text, re.S | re.M)
    assert array, ".ci/run must list the README's commands in README_COMMANDS=( ... )"
    return [re.fullmatch(r"\s*'(.*)'\s*", line).group(1) for line in array.group(1).splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    cmds = readme_commands()
    assert len(cmds) == 2
    assert cmds[0] == 'pip install -e ".[demo]" && python -m mdpd_vl.tasks.itr'
    assert cmds[1].endswith("pytest") and ".[all,dev]" in cmds[1]


def test_ci_runs_both_readme_commands_verbatim_in_order():
    assert ci_commands() == readme_commands()
    text = CI.read_text()
    loop = text.index('for cmd in "${README_COMMANDS[@]}"; do\n  echo "ci: running')
    # ... in a fresh clone of the committed HEAD, in a fresh venv, without our environment
    for needed in ("git clone", 'checkout --quiet --detach "$head"', "mktemp -d", 'python3 -m venv "$envs/venv"',
                   "unset PYTHONPATH MDPD_DATA MDPD_CACHE", "exit 1", "min %02d s wall"):
        assert needed in text, needed
    assert text.index("git clone") < text.index("python3 -m venv") < loop
    assert CI.stat().st_mode & 0o111, ".ci/run must be executable"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_ci_clones_the_committed_head_into_an_empty_folder():
    done = subprocess.run(["bash", str(CI), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"ci: clone of {head[:12]} in ")
    assert [line.removeprefix("ci: would run: ") for line in lines[1:]] == readme_commands()
    clone = Path(lines[0].rsplit(" in ", 1)[1])
    assert not clone.parent.exists()  # the temporary folder is removed afterwards


def test_every_top_level_folder_has_a_readme():
    for folder in ["mdpd_vl", "tasks", "data_prep", "configs", "tests", "model_cards"]:
        assert (ROOT / folder / "README.md").is_file(), folder
