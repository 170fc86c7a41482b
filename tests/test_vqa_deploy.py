"""The deployed VQA model (`mdpd_vl.deploy.vqa.VisualQuestionAnswerer`) on tiny cross-modal backbones:
faded MDPD and merged LoRA export and reload through `load_exported` with identical answers, the
export carries its preprocessing and answers, side-kept models are not exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from vqa_helpers import questions_of, shapes_world, tiny_crossmodal, word_tokenizer

from mdpd_vl.data.datasets import load_index
from mdpd_vl.deploy.retrieval import image_preprocess
from mdpd_vl.deploy.vqa import VisualQuestionAnswerer
from mdpd_vl.errors import UserError
from mdpd_vl.export import is_plain, load_exported
from mdpd_vl.tasks import kit
from mdpd_vl.tasks.vqa_model import VQAConfig, build_vqa_model
from mdpd_vl.tuning import MethodConfig

ANSWERS = ["yes", "no", "red", "2", "circle"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shapes_world(tmp_path_factory.mktemp("vqa_deploy_world"))


@pytest.fixture(scope="module")
def tokenizer(world: Path) -> Any:
    return word_tokenizer(questions_of(world))


def _questions(world: Path, n: int = 5) -> tuple[list[Path], list[str]]:
    index = load_index(world / "vqa" / "val.index.json")
    items = index["items"][:n]
    return [Path(index["media_root"]) / it["image"] for it in items], [it["question"] for it in items]


def _model(tokenizer: Any, method: MethodConfig) -> Any:
    backbone = tiny_crossmodal("cnn", tokenizer)
    torch.manual_seed(0)
    model = build_vqa_model(backbone, method, ANSWERS, VQAConfig())
    for name, p in model.named_parameters():  # nonzero LoRA deltas, so that merging matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


def _preprocess(backbone: Any) -> dict[str, Any]:
    return {"image": image_preprocess(64, backbone), "text": {"max_length": 12}, "batch_size": 2}


@pytest.mark.parametrize("method", [MethodConfig(name="lora", lora_r=2),
                                    MethodConfig(name="mdpd", distill={"d": 4, "backbone_trainable": "norms_all"})],
                         ids=["lora_merged", "mdpd_faded"])
def test_export_reload_gives_identical_answers(world: Path, tokenizer: Any, method: MethodConfig,
                                               tmp_path: Path) -> None:
    model = _model(tokenizer, method)
    deployed = model.answerer(preprocess=_preprocess(model.backbone))
    assert is_plain(deployed.model) and deployed.exportable()
    images, questions = _questions(world)
    logits = deployed.logits(images, questions)
    if method.name == "lora":  # the merged copy answers as the live LoRA model (the image tower rehooked)
        live = VisualQuestionAnswerer(model.tuned.model, deployed.preprocess, ANSWERS, model.backbone)
        assert torch.allclose(live.logits(images, questions), logits, atol=1e-5)
    folder = kit.export(deployed, tmp_path / "export")
    reloaded = load_exported(folder)
    reloaded.backbone.text._tokenizer = tokenizer  # the tests' word tokenizer lives in memory, not in a folder
    assert isinstance(reloaded, VisualQuestionAnswerer) and reloaded.answers == ANSWERS
    assert reloaded.preprocess == deployed.preprocess
    assert torch.equal(reloaded.logits(images, questions), logits)
    assert reloaded.answer(images, questions) == deployed.answer(images, questions)
    pil = [Image.open(p).convert("RGB") for p in images]
    assert reloaded.answer(pil, questions) == reloaded.answer([str(p) for p in images], questions)


def test_batches_follow_the_preprocessing_and_errors_are_clear(world: Path, tokenizer: Any, tmp_path: Path) -> None:
    model = _model(tokenizer, MethodConfig(name="mdpd", distill={"d": 4, "backbone_trainable": "head"}))
    deployed = model.answerer(preprocess=_preprocess(model.backbone))
    images, questions = _questions(world)
    batches = list(deployed.input_batches(images, questions))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1] and batches[0]["images"].shape[-1] == 64
    assert all(b["input_ids"].shape[1] <= 12 for b in batches)
    with pytest.raises(ValueError, match="5 images but 4 questions"):
        deployed.answer(images, questions[:4])
    side = model.answerer(side_kept=True, preprocess=deployed.preprocess)
    assert not side.exportable() and kit.export(side, tmp_path / "side") is None
    assert len(side.answer(images, questions)) == 5
    folder = kit.export(deployed, tmp_path / "export")
    config = json.loads((folder / "config.json").read_text())
    config["answers"] = []
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="answers"):
        load_exported(folder)
