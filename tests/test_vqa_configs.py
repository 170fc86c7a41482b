"""Every shipped VQA config loads into the recipe's dataclass, names the command that runs it on its
first line, and is what its name says: `<dataset>[-gqa]_<method>[-norms].yaml` (`-gqa`: the shapes
world's GQA questions; `-norms`: MDPD with norms_all + activation checkpointing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdpd_vl.engine.config import load_config
from mdpd_vl.tasks.vqa import DATASET_PRESETS, VQARunConfig, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "vqa").glob("*.yaml"))
METHODS = {"linear", "partial", "lora", "adapter", "unipt", "sherl", "lst", "mdpd", "mdpd-norms"}


def test_there_are_configs_for_every_compared_method_and_each_real_dataset() -> None:
    names = {p.stem for p in CONFIGS}
    assert {f"shapes_{m}" for m in METHODS} <= names and {f"shapes-gqa_{m}" for m in METHODS} <= names
    assert {"vqav2_mdpd", "vqav2_unipt", "gqa_mdpd", "gqa_unipt"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path: Path) -> None:
    cfg = load_config(VQARunConfig, path)
    rel = path.relative_to(ROOT).as_posix()
    assert path.read_text().splitlines()[0] == f"# python -m mdpd_vl.tasks.vqa --config {rel}"
    dataset, method = path.stem.split("_", 1)
    assert cfg.data.dataset == dataset.removesuffix("-gqa")
    assert cfg.vqa.task == ("gqa" if dataset in ("gqa", "shapes-gqa") else "vqa")
    assert cfg.method.name == method.removesuffix("-norms")
    if method == "mdpd-norms":
        assert cfg.method.distill.backbone_trainable == "norms_all" and cfg.method.distill.checkpointing
    elif method == "mdpd":
        assert cfg.method.distill.backbone_trainable == "head"


@pytest.mark.parametrize("dataset", ["shapes", "vqav2", "gqa"])
def test_the_default_config_of_a_dataset_is_its_preset(dataset: str) -> None:
    """A shipped `<dataset>_mdpd.yaml` holds exactly what `--dataset <dataset>` resolves to."""
    shipped = load_config(VQARunConfig, ROOT / "configs" / "vqa" / f"{dataset}_mdpd.yaml")
    assert shipped == resolve_config(parse_args(["--dataset", dataset])), DATASET_PRESETS[dataset]
