"""The VQA recipe's splits and vocabularies without a model: LXMERT's minival / nominival split of
VQAv2 val (CLIP-ViL trains on `train,nominival` and validates on `minival`), the answer vocabulary
each dataset gets (`auto`), the real datasets' presets (CLIP-ViL's image tower and schedule), and
the run's objective in words."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mdpd_vl.data.shapes_world import ensure_shapes
from mdpd_vl.errors import UserError
from mdpd_vl.tasks import vqa_data as vd
from mdpd_vl.tasks import vqa_setup as setup
from mdpd_vl.tasks.vqa import parse_args, resolve_config


@pytest.fixture(scope="module")
def vqav2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `vqav2` data folder holding the tiny shapes world's VQA indexes (train, val)."""
    root = tmp_path_factory.mktemp("data")
    shapes = ensure_shapes(root / "shapes", "tiny", 0, tasks=["vqa"]) / "vqa"
    (root / "vqav2").mkdir()
    for split in ("train", "val"):
        shutil.copy(shapes / f"{split}.index.json", root / "vqav2" / f"{split}.index.json")
    return root


def _minival(root: Path, tmp_path: Path, as_objects: bool) -> tuple[Path, set[str]]:
    items = json.loads((root / "vqav2" / "val.index.json").read_text())["items"]
    ids = [it["question_id"] for it in items[::3]]
    path = tmp_path / "minival.json"
    path.write_text(json.dumps([{"question_id": q, "img_id": "x"} for q in ids] if as_objects else ids))
    return path, {str(q) for q in ids}


@pytest.mark.parametrize("as_objects", [True, False])
def test_minival_and_nominival_partition_val(vqav2_root: Path, tmp_path: Path, as_objects: bool) -> None:
    path, ids = _minival(vqav2_root, tmp_path, as_objects)
    cfg = resolve_config(parse_args(["--dataset", "vqav2", "--data-root", str(vqav2_root),
                                     "--set", "data.train_splits=[train,nominival]", "--set", "data.eval_split=minival",
                                     "--set", f"data.minival_file={path}"]))
    assert setup.check(cfg) == "vqa" and setup.eval_split(cfg, "vqa") == "minival"
    folder = setup.index_dir(cfg, "vqa")  # minival / nominival need only val.index.json
    val = vd.split_index(folder, "val", "vqa")["items"]
    mini = vd.split_index(folder, "minival", "vqa", str(path))
    nomini = vd.split_index(folder, "nominival", "vqa", str(path))
    assert mini["split"] == "minival" and nomini["split"] == "nominival"
    got_mini = [str(it["question_id"]) for it in mini["items"]]
    got_nomini = [str(it["question_id"]) for it in nomini["items"]]
    assert set(got_mini) == ids and not set(got_mini) & set(got_nomini)
    assert sorted(got_mini + got_nomini) == sorted(str(it["question_id"]) for it in val)
    split = vd.load_split(folder, "nominival", "vqa", {}, minival_file=str(path), check_images=False)
    assert split.name == "nominival" and len(split.items) == len(got_nomini)


def test_nominival_without_a_minival_file_is_one_line(vqav2_root: Path, tmp_path: Path) -> None:
    cfg = resolve_config(parse_args(["--dataset", "vqav2", "--data-root", str(vqav2_root),
                                     "--set", "data.train_splits=[train,nominival]"]))
    with pytest.raises(UserError, match="minival.json") as err:
        setup.check(cfg)
    assert err.value.field == "data.minival_file"
    bad = tmp_path / "ids.json"
    bad.write_text(json.dumps([987654321]))  # no val question in it: minival would be empty
    with pytest.raises(UserError, match="no val question is in the minival split"):
        vd.split_index(vqav2_root / "vqav2", "minival", "vqa", str(bad))
    bad.write_text(json.dumps({"question_id": 1}))
    with pytest.raises(UserError, match="expected a list"):
        vd.minival_ids(str(bad), "minival")


def test_auto_vocabularies_are_clipvils_for_real_data_and_the_training_answers_for_shapes(vqav2_root: Path) -> None:
    assert len(vd.answer_vocab("auto", "vqav2", [])) == 3129 and len(vd.answer_vocab("auto", "gqa", [])) == 1842
    train = vd.split_index(vqav2_root / "vqav2", "train", "vqa")
    vocab = vd.answer_vocab("auto", "shapes", [train])
    seen = {a for it in train["items"] for a in it["answers"]}
    assert set(vocab) == seen and sorted(vocab.values()) == list(range(len(seen)))


@pytest.mark.parametrize("dataset", ["vqav2", "gqa"])
def test_real_presets_are_clipvils_tower_and_schedule(dataset: str) -> None:
    cfg = resolve_config(parse_args(["--dataset", dataset]))
    assert (cfg.backbone, cfg.pretrained, cfg.text_backbone) == ("RN50x4", "openai", None)
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs, cfg.train.schedule) == (32, 8, 5, "linear")
    assert not cfg.data.cache_grids and not cfg.data.cache_features and cfg.data.image_size is None
    assert setup.eval_split(cfg, cfg.vqa.task) == ("val" if dataset == "vqav2" else "testdev")
    assert cfg.data.train_splits == (["train"] if dataset == "vqav2" else ["train", "val"])
    flag = resolve_config(parse_args(["--dataset", dataset, "--backbone", "offline"]))
    assert flag.backbone == "offline"  # flags win over the preset


def test_the_objective_in_words_names_vqas_losses_and_answer_distillation() -> None:
    from mdpd_vl.tasks.vqa import objective

    def words(*sets: str) -> str:
        return objective(resolve_config(parse_args([a for s in sets for a in ("--set", s)])))

    kl = words("vqa.temperature=2")
    assert "soft scores" in kl and "on the side path and on the backbone path" in kl
    assert "KL of the answer distributions (temperature 2, weight 1)" in kl and "eq. 3" not in kl
    mse = words("vqa.logits=mse", "vqa.task=gqa", "vqa.backbone_task=false")
    assert "answer-logits MSE of paper eq. 3 (weight 0.0001" in mse and "single GQA answer" in mse
    assert "the backbone path gets no task loss" in mse
    assert "gets no distillation term" in words("vqa.logits=none")
    lora = words("method.name=lora", "vqa.task=gqa", "vqa.gqa_loss=bce")
    assert lora.startswith("LoRA") and "one-hot GQA answer" in lora and "merged into the weights" in lora
