"""The shipped VTR configs (tests/test_configs.py loads every one and checks its first line): one per
compared method on the shapes videos, MDPD / UniPT / LoRA on MSR-VTT and MSVD with CLIP ViT-B/32, and
each real-dataset file is exactly what its command-line spelling resolves to."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mdpd_vl.engine.config import load_config
from mdpd_vl.tasks.vtr import VTRTaskConfig, parse_args, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {p.stem: p for p in (ROOT / "configs" / "vtr").glob("*.yaml")}
COMPARED = ("linear", "partial", "bitfit", "lora", "adapter", "unipt", "sherl", "lst", "mdpd", "mdpd-norms")


def test_every_compared_method_and_the_real_recipes_have_a_config() -> None:
    assert {f"shapes_{m}" for m in COMPARED} <= set(CONFIGS)
    assert {f"{d}_{m}" for d in ("msrvtt", "msvd") for m in ("mdpd", "unipt", "lora")} <= set(CONFIGS)


def test_the_shapes_mdpd_config_is_the_embedded_default() -> None:
    assert load_config(VTRTaskConfig, CONFIGS["shapes_mdpd"]) == resolve_config(parse_args([]))


@pytest.mark.parametrize("name", sorted(n for n in CONFIGS if not n.startswith("shapes")))
def test_a_real_config_is_its_dataset_preset_on_clip_vit_b32(name: str) -> None:
    """`--dataset D --method M --backbone ViT-B-32 --pretrained openai` + CLIP's trained logit scale
    (log 100, which CLIP4Clip loads with the CLIP weights), field for field."""
    dataset, method = name.split("_", 1)
    shipped = load_config(VTRTaskConfig, CONFIGS[name])
    spelled = resolve_config(parse_args(["--dataset", dataset, "--method", method, "--backbone", "ViT-B-32",
                                         "--pretrained", "openai", "--set", f"vtr.logit_scale_init={math.log(100)}"]))
    assert shipped == spelled
    assert (shipped.data.fps, shipped.data.max_frames, shipped.data.max_text_len) == (1, 12, 32)  # CLIP4Clip's
    assert (shipped.train.epochs, shipped.train.batch_size, shipped.train.lr) == (5, 128, 1e-4)
    assert shipped.data.expand_sentences == (dataset == "msrvtt")
    assert shipped.data.image_size is None and not shipped.data.cache_features
