"""The grounding recipe end to end on tiny shapes referring expressions: CLI runs (placement A per method family,
the loss falling over 2 steps on one fixed batch), every output (precision@0.5 per split with IoU and GIoU for the
deployed and side-kept model, latency, efficiency, constant-box baseline, examples.png, export + card whose Use
snippet runs), export -> reload -> identical boxes through `load_exported` alone, placement B (a `--method full`
run's MDETR checkpoint fine-tuned with MDPD through `--pretrained`), bad annotations counted, user errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from mdpd_vl.tasks import vg

TINY = ["--set", "data.shapes_scale=tiny", "--set", "data.image_size=64", "--set", "train.max_steps=2",
        "--set", "train.batch_size=8", "--set", "data.max_train_expressions=8", "--set", "data.timed_batch=4",
        "--set", "grounding.dropout=0.0", "--set", "train.log_every=1", "--set", "train.warmup_ratio=0.0",
        "--set", "train.lr=1e-3", "--set", "data.eval_batch_size=16", "--set", "train.max_grad_norm=null"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vg")


def run_cli(root: Path, name: str, *args: str) -> dict:
    out = root / "runs" / name
    assert vg.main(["--data-root", str(root / "data"), "--output-dir", str(out), *TINY, *args]) == 0
    return json.loads((out / "results.json").read_text())


def task_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r["task"] for r in rows if "task" in r]


@pytest.fixture(scope="module")
def mdpd_run(root) -> dict:
    return run_cli(root, "mdpd")


def test_default_mdpd_run_writes_every_output(mdpd_run, root, capsys):
    r, out = mdpd_run, root / "runs" / "mdpd"
    assert r["task"] == "vg" and r["method"] == "mdpd" and r["placement"] == "backbones" and r["cached_features"]
    for metrics in (r["metrics"], r["metrics_side_kept"]):
        for split in ("val", "testA", "testB"):
            assert 0 <= metrics[f"{split}_giou"] <= metrics[f"{split}_iou"] <= 100  # GIoU <= IoU
            # MDETR's P@k (GIoU) ranks every query: the answer is the top one, so P@1 <= P@5 <= P@10
            assert metrics[f"{split}_giou"] <= metrics[f"{split}_p_at_5"] <= metrics[f"{split}_p_at_10"] <= 100
        assert metrics["precision"] == metrics["val_iou"]
    eff = r["efficiency"]
    assert eff["latency_ms"] > 0 and eff["latency_ms_bare"] > 0 and eff["latency_ms_side_kept"] > 0
    assert eff["infer_qps"] > 0 and eff["train_peak_bytes"] > 0
    assert eff["inference_params"] < eff["inference_params_side_kept"]  # the faded model has no side module
    assert set(r["constant_box_baseline"]["precision"]) == {"train", "val", "testA", "testB"}
    losses = task_losses(out)
    assert len(losses) == 2 and losses[1] < losses[0]  # one fixed batch of 8: the step lowers its loss
    assert (out / "examples.png").stat().st_size > 1000 and (out / "mdetr" / "config.json").is_file()
    card = (out / "MODEL_CARD.md").read_text()
    assert "P@0.5 IoU / GIoU" in card and "best constant box" in card


def test_export_reloads_to_identical_boxes_and_the_card_snippet_runs(mdpd_run, root, capsys, monkeypatch):
    from mdpd_vl.export import load_exported
    from mdpd_vl.tasks import vg_eval as ev

    out = root / "runs" / "mdpd"
    model = load_exported(out / "export")
    assert type(model).__name__ == "ReferringGrounder"
    split = ev.EvalSplit.load(root / "data" / "shapes" / "refcoco", "testB")
    boxes = model.ground(split.paths, split.sentences)
    again = load_exported(out / "export").ground(split.paths, split.sentences)
    assert boxes.shape == (len(split.paths), 4) and torch.equal(boxes, again)
    saved = torch.tensor(json.loads((out / "predictions_testB.json").read_text())["boxes"])
    assert torch.allclose(boxes, saved, atol=1e-3)  # what the run's own evaluation scored
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and (boxes <= 64.0 * 2).all()
    snippet = re.search(r"```python\n(.*?)```", (out / "MODEL_CARD.md").read_text(), re.S).group(1)
    monkeypatch.chdir(Path.cwd())
    capsys.readouterr()
    exec(compile(snippet, "MODEL_CARD.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tensor" in printed


@pytest.mark.parametrize("method", ["linear", "lora", "unipt"])
def test_other_methods_run_and_their_loss_falls(method, root):
    r = run_cli(root, method, "--method", method)
    losses = task_losses(root / "runs" / method)
    assert losses[1] < losses[0]
    assert r["metrics_side_kept"] is None
    assert (r["export_dir"] is None) == (method == "unipt")  # side-kept networks are not a plain model
    assert (r["mdetr_checkpoint"] is None) == (method in ("unipt", "lora"))


def test_placement_b_full_checkpoint_then_mdpd_fine_tune(root):
    full = run_cli(root, "full", "--method", "full")
    ckpt = full["mdetr_checkpoint"]
    assert ckpt and Path(ckpt, "model.safetensors").is_file()
    r = run_cli(root, "b_mdpd", "--pretrained", ckpt, "--method", "mdpd")
    assert r["placement"] == "transformer" and r["config"]["pretrained"] == ckpt
    assert r["config"]["method"]["distill"]["feature_layers"] == "all"  # the MDETR's layers, not the towers' 2-5
    assert r["metrics_side_kept"] is not None and r["export_dir"] is not None
    assert task_losses(root / "runs" / "b_mdpd")[1] < task_losses(root / "runs" / "b_mdpd")[0]
    from mdpd_vl.export import load_exported

    model = load_exported(r["export_dir"])
    img = next((root / "data" / "shapes" / "raw" / "refcoco").rglob("*.jpg"))
    assert model.ground([img, img], ["the circle", "the red shape"]).shape == (2, 4)


def test_bad_annotations_are_counted_not_fatal(root):
    """Boxes outside the image clipped, zero-size boxes / no annotation / a missing image skipped: all counted."""
    src = root / "data" / "shapes" / "refcoco"
    if not src.is_dir():
        run_cli(root, "seed_data", "--method", "linear")
    bad_root = root / "bad"
    dst = bad_root / "refcoco"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    index = json.loads((dst / "train.index.json").read_text())
    items = index["items"]
    items[0]["bbox_xyxy"] = [-10.0, -5.0, 40.0, 300.0]  # reaches outside: clipped, kept
    items[1]["bbox_xyxy"] = [10.0, 10.0, 10.0, 30.0]  # zero width: skipped
    items[2]["width"] = 0  # no usable annotation (a canonical index never holds a null box: the prep counts those)
    items[3]["image"] = "COCO_train2014_missing.jpg"  # missing image: skipped
    items[4]["sentence"] = " "  # no expression: skipped
    (dst / "train.index.json").write_text(json.dumps(index))
    out = root / "runs" / "bad"
    args = ["--data-root", str(bad_root), "--output-dir", str(out), "--config", str(config("shapes_linear")), *TINY,
            "--set", "data.dataset=refcoco"]
    assert vg.main(args) == 0
    problems = json.loads((out / "results.json").read_text())["problems"]["train"]
    assert problems == {"clipped": 1, "degenerate": 1, "no_annotation": 1, "blank_sentence": 1, "missing_image": 1}


def config(name: str) -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "vg" / f"{name}.yaml"


@pytest.mark.parametrize(("argv", "words"), [
    (["--method", "nonsense"], "--method"),
    (["--set", "vg.placement=transformer"], "--pretrained"),
    (["--set", "data.variant=refcocox"], "data.variant"),
    (["--backbone", "resnet-9000"], "--backbone"),
])
def test_user_errors_are_one_line_naming_the_option(argv, words, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        vg.main(["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), *argv])
    assert err.value.code == 2
    msg = capsys.readouterr().err.strip()
    assert len(msg.splitlines()) == 1 and words in msg
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_real_data_names_the_prep_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        vg.main(["--dataset", "refcoco", "--variant", "refcocog", "--data-root", str(tmp_path),
                 "--output-dir", str(tmp_path / "out")])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "data_prep/refcoco.py" in msg and "--variant refcocog --split-by umd" in msg


def test_gains_table_compares_mdpd_with_each_side_kept_method():
    from mdpd_vl.tasks import kit

    def run(method: str, p: float, qps: float) -> dict:
        return {"method": method, "metrics": {"precision": p}, "efficiency": {"infer_qps": qps, "infer_qps_bare": 10.0}}

    runs = [run("linear", 20.0, 10.0), run("unipt", 50.0, 5.0), run("mdpd", 52.5, 10.0)]
    text = kit.gains_table(runs, ["linear", "unipt", "mdpd:head"], "precision", "P@0.5")
    rows = [line for line in text.splitlines() if line.startswith("| mdpd:head")]
    assert len(rows) == 1 and "| unipt |" in rows[0] and "| 2.50 |" in rows[0] and "+100.0%" in rows[0]
    assert kit.gains_table(runs[:2], ["linear", "unipt"], "precision", "P@0.5") == ""
