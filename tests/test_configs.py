"""Every shipped config loads into its recipe's dataclass, and its first line is the command that runs it."""

from pathlib import Path

import pytest

from mdpd_vl.engine.config import load_config
from mdpd_vl.tasks.itr import ITRConfig
from mdpd_vl.tasks.vtr import VTRTaskConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"itr": ITRConfig, "vtr": VTRTaskConfig}
# configs/vqa/ names the question set and MDPD variant too: tests/test_vqa_configs.py checks those
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name in RECIPES)


def test_there_are_configs():
    assert {p.parent.name for p in CONFIGS} >= set(RECIPES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_names_its_command(path: Path):
    cfg = load_config(RECIPES[path.parent.name], path)
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT).as_posix()
    assert first == f"# python -m mdpd_vl.tasks.{path.parent.name} --config {rel}"
    dataset, method = path.stem.split("_", 1)
    assert cfg.data.dataset == dataset and cfg.method.name == method
