"""Every shipped config loads into its recipe's dataclass, and its first line is the command that runs it."""

from pathlib import Path

import pytest

from mdpd_vl.engine.config import load_config
from mdpd_vl.tasks.itr import ITRConfig
from mdpd_vl.tasks.vtr import VTRTaskConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"itr": ITRConfig, "vtr": VTRTaskConfig}
PROTOCOLS = {"research.yaml"}  # protocol files of a study (not named <dataset>_<method>)
ROWS = {"frontier.yaml", "cost_cuts.yaml"}  # rows files of python -m mdpd_vl.tasks.fading (tests/test_fading.py loads them)
# configs/vqa and configs/vg have their own tests (tests/test_vqa_configs.py, tests/test_vg_configs.py)
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.name not in ROWS and p.parent.name in RECIPES)
VARIANTS = {  # name suffix -> what the config must then say
    "": lambda cfg: cfg.method.name != "mdpd" or cfg.method.distill.backbone_trainable in ("head", "norms_all"),
    "norms": lambda cfg: cfg.method.distill.backbone_trainable == "norms_all" and cfg.method.distill.checkpointing,
    "seqTransf": lambda cfg: cfg.vtr.sim == "seqTransf",
}


def test_there_are_configs():
    assert {p.parent.name for p in CONFIGS} >= set(RECIPES)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_loads_and_names_its_command(path: Path):
    cfg = load_config(RECIPES[path.parent.name], path)
    first = path.read_text().splitlines()[0]
    rel = path.relative_to(ROOT).as_posix()
    assert first == f"# python -m mdpd_vl.tasks.{path.parent.name} --config {rel}"
    if path.name in PROTOCOLS:
        return
    dataset, name = path.stem.split("_", 1)
    method, _, variant = name.partition("-")  # `<method>-<variant>`: one setting spelled out in the name
    assert cfg.data.dataset == dataset and cfg.method.name == method
    assert variant in VARIANTS and VARIANTS[variant](cfg), variant
