"""The shipped ITR configs (tests/test_configs.py loads every one and checks its first line): each is
exactly what its command-line spelling resolves to, field for field, so a file and the flags it names
cannot drift apart; the embedded default and the real-dataset presets carry the fading frontier's pick
(tasks/fading.md, "Defaults chosen")."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdpd_vl.engine.config import load_config
from mdpd_vl.tasks.itr import DATASET_PRESETS, ITRConfig, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = {"research", "frontier", "cost_cuts"}  # the frontier's files, not recipes of one dataset
CONFIGS = {p.stem: p for p in (ROOT / "configs" / "itr").glob("*.yaml") if p.stem not in PROTOCOLS}


def spelled(name: str) -> list[str]:
    """`shapes_mdpd` = no flags (the embedded default); `<dataset>_<method>` = --dataset / --method."""
    dataset, method = name.split("_", 1)
    argv = [] if name == "shapes_mdpd" else ["--method", method]
    return argv + ([] if dataset == "shapes" else ["--dataset", dataset])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_config_is_its_command_line_spelling(name: str) -> None:
    assert load_config(ITRConfig, CONFIGS[name]) == resolve_config(parse_args(spelled(name)))


def test_every_shipped_file_spells_every_field() -> None:
    """A reader sees every setting (the frontier's axes included), not only those older than the file."""
    for name, path in CONFIGS.items():
        text = path.read_text()
        for key in ("head_layers:", "backbone_trainable:", "checkpointing:", "gen_width:", "backbone_mode:"):
            assert key in text, f"{name} lacks {key}"


@pytest.mark.parametrize("dataset", ["shapes", *DATASET_PRESETS])
def test_mdpd_defaults_are_the_frontiers_pick(dataset: str) -> None:
    """The image tower's deployed W_B reads pooled features of the last layers besides the last one (the
    frontier's measured pick: within 5% of lora's Rsum at <= 1.02 x the bare FLOPs); the backbone stays frozen."""
    cfg = resolve_config(parse_args(["--dataset", dataset]))
    assert cfg.method.name == "mdpd"
    assert cfg.method.distill.head_layers == DEFAULT_HEAD_LAYERS
    assert cfg.method.distill.backbone_trainable == "head"


DEFAULT_HEAD_LAYERS = {"image": "last_3"}


@pytest.mark.parametrize("layers", ["{text: last_3}", "last"])
def test_a_per_tower_head_layers_replaces_the_default_never_merges_with_it(layers: str, tmp_path: Path) -> None:
    """The default is {image: last_3}: `{text: last_3}` must mean the text tower alone, from the command
    line and from a file that gives `distill` in part."""
    want = {"text": "last_3"} if layers.startswith("{") else "last"
    assert load_config(ITRConfig, None, [f"method.distill.head_layers={layers}"]).method.distill.head_layers == want
    path = tmp_path / "partial.yaml"
    path.write_text(f"method:\n  distill:\n    head_layers: {layers}\n")
    assert load_config(ITRConfig, path).method.distill.head_layers == want
    assert load_config(ITRConfig, ROOT / "configs/itr/research.yaml",
                       [f"method.distill.head_layers={layers}"]).method.distill.head_layers == want
