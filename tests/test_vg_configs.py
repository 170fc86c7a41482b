"""Every shipped grounding config loads into the recipe's dataclass, names the command that runs it on its first
line, and is what its name says: `<variant>[-mdetr]_<method>[-norms].yaml` (`shapes`: the shapes world; `-mdetr`:
placement B over a pre-trained MDETR given as `pretrained`; `-norms`: MDPD with norms_all + checkpointing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mdpd_vl.engine.config import load_config
from mdpd_vl.tasks.vg import VARIANTS, VGRunConfig, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "vg").glob("*.yaml"))
COMPARED = {"linear", "partial", "lora", "unipt", "sherl", "lst", "mdpd", "mdpd-norms", "full"}


def test_there_are_configs_for_every_compared_method_and_each_variant() -> None:
    names = {p.stem for p in CONFIGS}
    assert {f"shapes_{m}" for m in COMPARED} <= names
    assert {f"{v}_mdpd" for v in VARIANTS} <= names and {"refcoco-mdetr_mdpd", "refcoco-mdetr_unipt"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path: Path) -> None:
    cfg = load_config(VGRunConfig, path)
    rel = path.relative_to(ROOT).as_posix()
    assert path.read_text().splitlines()[0] == f"# python -m mdpd_vl.tasks.vg --config {rel}"
    data, method = path.stem.split("_", 1)
    variant = data.removesuffix("-mdetr")
    assert cfg.data.dataset == ("shapes" if variant == "shapes" else "refcoco")
    assert cfg.data.variant == ("refcoco" if variant == "shapes" else variant)
    assert cfg.method.name == method.removesuffix("-norms")
    assert (cfg.vg.placement == "transformer") == data.endswith("-mdetr") == (cfg.pretrained is not None)
    if method == "mdpd-norms":
        assert cfg.method.distill.backbone_trainable == "norms_all" and cfg.method.distill.checkpointing
    elif method == "mdpd":
        assert cfg.method.distill.backbone_trainable == ("head" if variant == "shapes" else "norms_all")


@pytest.mark.parametrize(("name", "argv"), [("shapes_mdpd", []), ("refcoco_mdpd", ["--dataset", "refcoco"]),
                                            ("refcocog_mdpd", ["--dataset", "refcoco", "--variant", "refcocog"])])
def test_the_default_config_is_what_the_flags_resolve_to(name: str, argv: list[str]) -> None:
    """A shipped `<variant>_mdpd.yaml` holds exactly what its flags resolve to (no arguments: the embedded default)."""
    assert load_config(VGRunConfig, ROOT / "configs" / "vg" / f"{name}.yaml") == resolve_config(parse_args(argv))
