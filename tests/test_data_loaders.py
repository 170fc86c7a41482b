"""Loaders over the canonical index: output shapes, collate masks, video frame indices (decord and the
PyAV fallback, uniform and CLIP4Clip's 1 fps), the frame cache, and skip-and-count of bad files."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mdpd_vl.data import video as V
from mdpd_vl.data.cache import ArrayCache
from mdpd_vl.data.collate import Collator, pad_stack
from mdpd_vl.data.datasets import (
    GQADataset,
    GroundingDataset,
    ImageTextEval,
    ImageTextPairs,
    VideoTextDataset,
    VideoTextEval,
    VQADataset,
    build_answer_vocab,
    load_index,
)
from mdpd_vl.data.shapes_render import write_mp4
from mdpd_vl.data.shapes_world import TASK_DIRS, build_shapes
from mdpd_vl.data.transforms import box_transform, clip_transform, image_transform, transform_stats
from mdpd_vl.errors import UserError

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_shapes(out, "tiny", seed=0, progress=False)
    return out


def index(root: Path, task: str, split: str) -> Path:
    return root / TASK_DIRS[task] / f"{split}.index.json"


def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """A stand-in for a backbone tokenizer: one id per word, right-padded with 0."""
    ids = [[sum(map(ord, w)) % 97 + 1 for w in t.lower().split()] for t in texts]
    out = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, : len(row)] = torch.tensor(row)
    return {"input_ids": out, "attention_mask": (out != 0).long()}


# -- images -----------------------------------------------------------------------------------
def test_image_text_pairs_and_batches(root):
    tf = clip_transform(SIZE)
    per_caption = ImageTextPairs(index(root, "itr", "train"), tf)
    per_image = ImageTextPairs(index(root, "itr", "train"), tf, per="image")
    assert len(per_caption) == 5 * len(per_image) == 5 * 40
    batch = next(iter(DataLoader(per_caption, batch_size=6, collate_fn=Collator(tokenize))))
    assert batch["image"].shape == (6, 3, SIZE, SIZE) and len(batch["caption"]) == 6
    lengths = torch.tensor([len(c.split()) for c in batch["caption"]])
    assert torch.equal(batch["text"]["attention_mask"].sum(1), lengths)
    assert batch["text"]["input_ids"].shape[1] == lengths.max() and batch["skipped"] == 0
    # a random caption per image: reproducible for a given epoch, changes across epochs
    a = [per_image[i]["caption_index"] for i in range(40)]
    assert a == [per_image[i]["caption_index"] for i in range(40)]
    per_image.set_epoch(1)
    assert a != [per_image[i]["caption_index"] for i in range(40)]


def test_image_text_eval(root):
    ev = ImageTextEval(index(root, "itr", "test"), clip_transform(SIZE))
    assert len(ev.images) == 10 and len(ev.captions) == 50
    assert ev.caption_to_image[:6] == [0, 0, 0, 0, 0, 1] and ev.image_to_captions[1] == [5, 6, 7, 8, 9]
    item = ev.images[3]
    assert item["index"] == 3 and item["image"].shape == (3, SIZE, SIZE)


def test_vqa_gqa_grounding(root):
    tf = clip_transform(SIZE)
    vocab = json.loads((root / TASK_DIRS["vqa"] / "ans2label.json").read_text())
    vqa = VQADataset(index(root, "vqa", "train"), tf, vocab)
    s = vqa[0]
    assert s["target"].shape == (len(vocab),) and s["target"].max() > 0
    assert build_answer_vocab([load_index(index(root, "vqa", "train"))])  # from the items alone
    b = Collator(tokenize, text_key="question")([vqa[i] for i in range(4)])
    assert b["target"].shape == (4, len(vocab)) and b["text"]["input_ids"].shape[0] == 4

    gvocab = json.loads((root / TASK_DIRS["gqa"] / "ans2label.json").read_text())
    g = GQADataset(index(root, "gqa", "val"), tf, gvocab)[0]
    assert g["label"] == gvocab[g["answer"]] and g["structural"] in ("query", "verify", "logical", "choose",
                                                                       "compare")

    ds = GroundingDataset(index(root, "refcoco", "val"), box_transform(SIZE))
    b = Collator(tokenize, text_key="sentence")([ds[i] for i in range(3)])
    assert b["image"].shape == (3, 3, SIZE, SIZE) and b["box"].shape == (3, 4)
    assert (b["box"] >= 0).all() and (b["box"] <= 1).all()
    cx, cy, w, h = b["box"][0] * 128
    assert torch.allclose(torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]), b["bbox_xyxy"][0],
                          atol=1e-3)


def test_corrupt_image_is_skipped_and_counted(root, tmp_path):
    data = load_index(index(root, "itr", "train"))
    media = Path(data["media_root"])
    shutil.copytree(media / "images", tmp_path / "images")
    bad = tmp_path / data["items"][1]["image"]
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated JPEG
    data["media_root"] = str(tmp_path)
    ds = ImageTextPairs(data, clip_transform(SIZE))
    with pytest.warns(UserWarning, match="skipping unreadable"):
        batch = Collator(tokenize)([ds[i] for i in range(4, 10)])  # captions of image 1 are items 5..9
    assert ds.skipped == 5 and list(ds.bad) == [str(bad)] and batch["skipped"] == 5
    assert batch["image_index"].tolist() == [0] + [2] * 5  # served the next readable image instead
    with pytest.raises(UserError, match=str(bad.name)):
        ImageTextEval(data, clip_transform(SIZE)).images[1]
    data["items"] = data["items"][1:2]
    with pytest.raises(RuntimeError, match="unreadable samples in a row"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ImageTextPairs(data, clip_transform(SIZE))[0]


def test_transform_bugs_are_not_skipped_and_regions_load(root, tmp_path):
    def broken(img):
        raise ValueError("a bug in the transform")

    with pytest.raises(ValueError, match="a bug"):  # only unreadable media are skipped, never bugs
        ImageTextPairs(index(root, "itr", "val"), broken)[0]
    np.save(tmp_path / "val_ims.npy", np.arange(3 * 4 * 8, dtype=np.float32).reshape(3, 4, 8))
    items = [{"feature_file": "val_ims.npy", "row": r, "image_id": r, "captions": ["a b", "c"]} for r in range(3)]
    regions = {"format": "mdpd_vl.index", "version": 1, "kind": "image_region", "media_root": str(tmp_path),
               "items": items + [{**items[0], "feature_file": "absent.npy"}]}
    ds = ImageTextPairs(regions, per="image")
    b = Collator(tokenize)([ds[i] for i in range(3)])
    assert b["regions"].shape == (3, 4, 8) and b["regions"][2, 0, 0] == 2 * 4 * 8 and b["region_mask"].all()
    with pytest.warns(UserWarning, match="absent.npy"):
        assert ds[3]["image_index"] == 0 and ds.skipped == 1


def test_load_index_errors_name_the_file(root, tmp_path):
    good = json.loads(index(root, "itr", "val").read_text())
    cases = {
        "trunc.json": index(root, "itr", "val").read_text()[:200],
        "format.json": json.dumps({**good, "format": "other"}),
        "fields.json": json.dumps({**good, "items": [{"image": "x.jpg"}]}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=name):
            load_index(tmp_path / name)
    with pytest.raises(UserError, match="expected video_text"):
        load_index(index(root, "itr", "val"), "video_text")
    with pytest.raises(UserError, match="not found"):
        load_index(tmp_path / "absent.index.json")


# -- videos -----------------------------------------------------------------------------------
def test_video_text_batches_mask_short_videos(root):
    tf = clip_transform(SIZE)
    long_enough = VideoTextDataset(index(root, "msrvtt", "train"), tf, V.FrameSampling(max_frames=4))
    b = Collator(tokenize)([long_enough[i] for i in range(3)])
    assert b["video"].shape == (3, 4, 3, SIZE, SIZE) and b["frame_mask"].all() and b["short_videos"] == 0

    short = VideoTextDataset(index(root, "msvd", "train"), tf, V.FrameSampling(max_frames=20), per="video")
    samples = [short[i] for i in range(3)]
    b = Collator(tokenize)(samples)
    lengths = [len(s["video"]) for s in samples]
    assert b["video"].shape == (3, max(lengths), 3, SIZE, SIZE)
    assert b["frame_mask"].sum(1).tolist() == lengths and b["short_videos"] == 3 and short.short_videos == 3
    assert (b["video"][~b["frame_mask"]] == 0).all()

    rep = VideoTextDataset(index(root, "msvd", "train"), tf, V.FrameSampling(max_frames=20, short="repeat"))
    assert rep[0]["video"].shape[0] == 20 and rep[0]["short"]

    ev = VideoTextEval(index(root, "msvd", "test"), tf, V.FrameSampling(max_frames=4))
    assert len(ev.videos) == 1 and ev.caption_to_video == [0] * len(ev.captions)


@pytest.fixture(scope="module")
def counter_mp4(tmp_path_factory) -> Path:
    """35 frames at 10 fps; frame k is uniformly grey at level 10 + 5k, so decoded frames name their index."""
    path = tmp_path_factory.mktemp("vid") / "count.mp4"
    write_mp4(path, [np.full((48, 64, 3), 10 + 5 * k, np.uint8) for k in range(35)], fps=10)
    return path


def decoded_indices(clip: V.Clip) -> list[int]:
    return [round((float(f.mean()) - 10) / 5) for f in clip.frames]


def clip4clip_cv2_loop(frame_count: int, native_fps: float, sample_fp: int) -> list[int]:
    """The frame positions CLIP4Clip's OpenCV extraction reads (a capture fails past the last frame)."""
    fps = int(native_fps)
    total = (frame_count + fps - 1) // fps
    interval = max(fps // sample_fp, 1)
    inds = list(np.arange(0, fps, interval))[:sample_fp]
    out, ret = [], True
    for sec in range(0, total + 1):
        if not ret:
            break
        for ind in inds:
            ret = sec * fps + ind < frame_count
            if not ret:
                break
            out.append(int(sec * fps + ind))
    return out


def test_fps_indices_match_clip4clip_loop():
    for n in (1, 7, 30, 31, 89, 300):
        for fps in (1.0, 10.0, 25.0, 29.97, 30.0):
            for k in (1, 2, 3):
                assert V.fps_indices(n, fps, k).tolist() == clip4clip_cv2_loop(n, fps, k), (n, fps, k)


@pytest.mark.parametrize("backend", ["decord", "av"])
def test_frame_indices_on_a_real_mp4(counter_mp4, backend):
    uniform = V.read_clip(counter_mp4, V.FrameSampling(max_frames=8), backend=backend)
    assert uniform.indices.tolist() == [0, 4, 9, 14, 19, 24, 29, 34] and uniform.num_frames == 35
    assert decoded_indices(uniform) == uniform.indices.tolist() and not uniform.short
    one_fps = V.read_clip(counter_mp4, V.FrameSampling(max_frames=12, fps=1), backend=backend)
    assert one_fps.indices.tolist() == clip4clip_cv2_loop(35, 10, 1) == [0, 10, 20, 30]
    assert decoded_indices(one_fps) == [0, 10, 20, 30] and one_fps.short  # 4 frames < 12
    sliced = V.read_clip(counter_mp4, V.FrameSampling(max_frames=4, fps=2), backend=backend)
    assert decoded_indices(sliced) == [0, 10, 20, 30]  # 7 frames at 2 fps, linspace down to 4
    assert uniform.backend == backend


def test_pyav_fallback_when_decord_is_missing_or_fails(counter_mp4, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    clip = V.read_clip(counter_mp4, V.FrameSampling(max_frames=8))
    assert clip.backend == "av" and decoded_indices(clip) == [0, 4, 9, 14, 19, 24, 29, 34]
    monkeypatch.delitem(sys.modules, "decord")

    def broken(path, sampling):
        raise RuntimeError("decord cannot read this file")

    monkeypatch.setattr(V, "_read_decord", broken)
    monkeypatch.setattr(V, "_warned", set())
    with pytest.warns(UserWarning, match="using PyAV"):
        assert V.read_clip(counter_mp4, V.FrameSampling(max_frames=3)).backend == "av"
    with pytest.raises(OSError, match="cannot read video"):
        V.read_clip(counter_mp4.with_name("absent.mp4"), V.FrameSampling())


def test_frame_cache_keys_on_mtime_and_params(counter_mp4, tmp_path, monkeypatch):
    import os

    cache = ArrayCache(tmp_path)
    s = V.FrameSampling(max_frames=5, size=16)
    first = V.read_clip(counter_mp4, s, cache=cache)
    again = V.read_clip(counter_mp4, s, cache=cache)
    assert again.backend == "cache" and np.array_equal(first.frames, again.frames) and cache.hits == 1
    assert first.frames.shape == (5, 16, 21, 3)
    assert V.read_clip(counter_mp4, V.FrameSampling(max_frames=6, size=16), cache=cache).backend != "cache"
    st = counter_mp4.stat()
    os.utime(counter_mp4, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert V.read_clip(counter_mp4, s, cache=cache).backend != "cache"
    monkeypatch.delenv("MDPD_CACHE", raising=False)
    assert not ArrayCache().enabled  # no folder and no MDPD_CACHE: no cache
    monkeypatch.setenv("MDPD_CACHE", str(tmp_path / "env"))
    assert ArrayCache().dir == tmp_path / "env" / "frames"


# -- transforms and collate -------------------------------------------------------------------
def test_transforms_prefer_the_backbone():
    class FakeBackbone:
        def transform(self, train: bool):
            return lambda img: torch.full((3, 8, 8), float(train))

    from PIL import Image

    img = Image.new("RGB", (50, 40), (200, 10, 10))
    assert image_transform(FakeBackbone(), train=True)(img).mean() == 1.0
    fallback = image_transform(None, size=SIZE)
    assert fallback(img).shape == (3, SIZE, SIZE)
    assert transform_stats(fallback) == {"size": SIZE, "mean": pytest.approx((0.48145466, 0.4578275, 0.40821073)),
                                         "std": pytest.approx((0.26862954, 0.26130258, 0.27577711))}
    assert box_transform(SIZE)(img).shape == (3, SIZE, SIZE)


def test_collate_rules():
    padded, mask = pad_stack([torch.ones(2, 3), torch.ones(4, 3)])
    assert padded.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    with pytest.raises(ValueError, match="attention_mask"):
        Collator(lambda texts: {"input_ids": torch.zeros(len(texts), 3)})([{"caption": "a"}])
    with pytest.raises(ValueError, match="shapes"):
        Collator()([{"image": torch.zeros(3, 4, 4)}, {"image": torch.zeros(3, 5, 5)}])
    regions = Collator(text_key=None)([{"regions": torch.ones(3, 8), "id": 1}, {"regions": torch.ones(5, 8), "id": 2}])
    assert regions["region_mask"].sum().item() == 8 and regions["id"].tolist() == [1, 2]
