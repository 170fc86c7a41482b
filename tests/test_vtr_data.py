"""Video-text data for CLIP4Clip: 1 fps + linspace frames as the official loader picks them, the frame
cache (identical frames, nothing decoded again, bad files remembered), decode timing, bad videos
skipped and counted in DataLoader workers, MSR-VTT 9k with / without expanded sentences, JSFUSION
1k-A, and the MSVD multi-sentence protocol (hand-made case, official pipeline, through a model)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_bert, build_tiny_vit
from torch.utils.data import DataLoader
from vtr_helpers import SIDE, tokenize, write_index, write_videos

from mdpd_vl.data import video as V
from mdpd_vl.data.cache import ArrayCache
from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import VideoTextDataset, VideoTextEval
from mdpd_vl.data.transforms import clip_transform
from mdpd_vl.errors import UserError
from mdpd_vl.eval.video_retrieval import encode_and_evaluate, evaluate_vtr


# -- frame selection ----------------------------------------------------------------------------
def official_frames(frame_count: int, native_fps: float, max_frames: int) -> list[int]:
    """What CLIP4Clip's loader keeps: `RawVideoExtractorCV2.video_to_tensor(sample_fp=1)` reads frame
    `sec * fps` of every second while a read succeeds, then `_get_rawvideo` slices with
    `np.linspace(0, n - 1, num=max_frames, dtype=int)` when there are more than max_frames."""
    fps = int(native_fps)
    read, sec = [], 0
    while sec <= (frame_count + fps - 1) // fps and sec * fps < frame_count:
        read.append(sec * fps)
        sec += 1
    if max_frames < len(read):
        read = [read[i] for i in np.linspace(0, len(read) - 1, num=max_frames, dtype=int)]
    return read


def test_clip4clip_sampling_matches_the_official_loader():
    for n in (1, 9, 29, 30, 31, 250, 601, 1800):
        for fps in (4.0, 24.0, 25.0, 29.97, 30.0):
            for m in (1, 4, 12):
                idx, short = V.select_indices(n, fps, V.clip4clip_sampling(m))
                assert idx.tolist() == official_frames(n, fps, m), (n, fps, m)
                assert short == (len(official_frames(n, fps, 10**6)) < m)
    with pytest.raises(V.ShortVideo):
        V.select_indices(40, 10.0, V.clip4clip_sampling(12, short="skip"))  # 4 seconds < 12 frames


# -- the frame cache ----------------------------------------------------------------------------
@pytest.fixture
def videos(tmp_path) -> Path:
    return write_videos(tmp_path, n_frames=[8, 5, 12, 6], captions_per_video=2)


def test_frame_cache_gives_the_decoded_frames_and_decodes_nothing_later(videos, tmp_path, monkeypatch):
    sampling = V.clip4clip_sampling(3)
    tf = clip_transform(SIDE)
    plain = VideoTextDataset(videos, tf, sampling, per="video")
    cached = VideoTextDataset(videos, tf, sampling, per="video", cache=tmp_path / "cache")
    first = [cached[i] for i in range(len(cached))]  # decodes and writes the cache
    assert len(list((tmp_path / "cache" / "frames").rglob("*.npz"))) == len(cached)

    def no_decoding(path, sampling):
        raise AssertionError("decoded although the frame cache holds this video")

    monkeypatch.setattr(V, "_read_decord", no_decoding)
    monkeypatch.setattr(V, "_read_av", no_decoding)
    again = VideoTextDataset(videos, tf, sampling, per="video", cache=ArrayCache(tmp_path / "cache"))
    for i, sample in enumerate(again[i] for i in range(len(again))):
        assert torch.equal(sample["video"], first[i]["video"])
        assert sample["decode_seconds"] > 0 and sample["preprocess_seconds"] > 0
    monkeypatch.undo()
    for i in range(len(plain)):  # identical to decoding without any cache
        assert torch.equal(plain[i]["video"], first[i]["video"])
        clip = V.read_clip(plain.media(plain.items[i]["video"]), sampling, cache=ArrayCache(tmp_path / "cache"))
        assert clip.backend == "cache"
        assert np.array_equal(clip.frames, V.read_clip(plain.media(plain.items[i]["video"]), sampling).frames)


def test_workers_decode_fill_the_cache_and_report_decode_time(videos, tmp_path):
    ds = VideoTextDataset(videos, clip_transform(SIDE), V.FrameSampling(max_frames=4), per="caption",
                          cache=tmp_path / "c")
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=Collator(tokenize))
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == len(ds) == 8
    for b in batches:
        assert b["video"].shape[1:] == (4, 3, SIDE, SIDE) and b["decode_seconds"].shape == (len(b["caption"]),)
        assert (b["decode_seconds"] > 0).all() and b["text"]["input_ids"].shape[0] == len(b["caption"])
    assert len(list((tmp_path / "c").rglob("*.npz"))) == 4  # each video written once, by whichever worker


# -- bad videos ---------------------------------------------------------------------------------
@pytest.fixture
def with_bad_videos(tmp_path) -> Path:
    write_videos(tmp_path, n_frames=[8, 8, 2, 8], captions_per_video=1)  # v2 is short (2 frames at 4 fps)
    (tmp_path / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (tmp_path / "videos" / "empty.mp4").write_bytes(b"")
    items = [{"video": f"videos/v{i}.mp4", "video_id": f"v{i}", "captions": [f"caption {i}"]} for i in range(4)]
    items.insert(1, {"video": "videos/corrupt.mp4", "video_id": "corrupt", "captions": ["broken"]})
    items.insert(2, {"video": "videos/empty.mp4", "video_id": "empty", "captions": ["nothing"]})
    items.append({"video": "videos/missing.mp4", "video_id": "missing", "captions": ["gone"]})
    return write_index(tmp_path / "bad.index.json", items, tmp_path)


@pytest.mark.parametrize("short, bad", [("mask", 3), ("skip", 4)])
def test_bad_videos_are_skipped_and_counted_in_workers(with_bad_videos, short, bad):
    ds = VideoTextDataset(with_bad_videos, clip_transform(SIDE), V.FrameSampling(max_frames=4, short=short),
                          per="video")
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=Collator(tokenize))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)  # never a crash mid-epoch
    assert sum(len(b["caption"]) for b in batches) == len(ds) == 7
    assert sum(b["skipped"] for b in batches) == bad  # corrupt, empty, missing (+ the short one)
    for b in batches:
        assert b["frame_mask"].any(1).all()  # never a sample without frames
        valid = b["video"][b["frame_mask"]]
        assert (valid.flatten(1).std(1) > 0).all()  # and never a zero-filled frame among the valid ones
    served = {c for b in batches for c in b["caption"]}
    assert served.isdisjoint({"broken", "nothing", "gone"}) and ("caption 2" in served) == (short == "mask")
    assert sum(b["short_videos"] for b in batches) == (1 if short == "mask" else 0) * \
        sum("caption 2" == c for b in batches for c in b["caption"])


def test_a_bad_video_is_remembered_by_the_cache_and_fatal_in_evaluation(with_bad_videos, tmp_path, monkeypatch):
    sampling = V.FrameSampling(max_frames=4)
    ds = VideoTextDataset(with_bad_videos, clip_transform(SIDE), sampling, per="video", cache=tmp_path / "cache")
    with pytest.warns(UserWarning) as seen:
        sample = ds[1]
    assert [Path(str(w.message).split()[3]).name for w in seen] == ["corrupt.mp4", "empty.mp4"]
    assert sample["skipped"] == 1 and sample["caption"] == "caption 1"  # served in place of item 1
    assert ds.skipped == 1 and len(ds.bad) == 2 and "cannot read video" in ds.bad[str(ds.media("videos/empty.mp4"))]

    def no_decoding(path, sampling):
        raise AssertionError("decoded a file the cache knows is bad")

    monkeypatch.setattr(V, "_read_decord", no_decoding)
    monkeypatch.setattr(V, "_read_av", no_decoding)
    with pytest.raises(OSError, match="remembered by the frame cache"):
        V.read_clip(tmp_path / "videos" / "corrupt.mp4", sampling, cache=ArrayCache(tmp_path / "cache"))
    monkeypatch.undo()
    ev = VideoTextEval(with_bad_videos, clip_transform(SIDE), sampling)
    with pytest.raises(UserError, match="corrupt.mp4.*evaluation needs every test item"):
        ev.videos[1]


# -- MSR-VTT and MSVD as the shapes world writes them ---------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from mdpd_vl.data.shapes_world import build_shapes

    out = tmp_path_factory.mktemp("world")
    build_shapes(out, "tiny", seed=0, progress=False)
    return out


def test_msrvtt_train_one_caption_per_video_or_all_and_jsfusion_test(world):
    from mdpd_vl.data.shapes_world import TASK_DIRS

    folder = world / TASK_DIRS["msrvtt"]
    tf = clip_transform(SIDE)
    per_video = VideoTextDataset(folder / "train.index.json", tf, V.clip4clip_sampling(4), per="video")
    expanded = VideoTextDataset(folder / "train.index.json", tf, V.clip4clip_sampling(4), per="caption")
    n_caps = [len(it["captions"]) for it in per_video.items]
    assert len(per_video) == len(per_video.items) and len(expanded) == sum(n_caps) and min(n_caps) > 1
    drawn = set()
    for seed in range(12):  # a random caption of the video each time it is served
        np.random.seed(seed)
        s = per_video[0]
        assert s["caption"] in per_video.items[0]["captions"] and s["video_index"] == 0
        drawn.add(s["caption_index"])
    assert len(drawn) > 1
    assert {(s["video_index"], s["caption_index"]) for s in (expanded[j] for j in range(n_caps[0]))} == \
        {(0, k) for k in range(n_caps[0])}
    test = VideoTextEval(folder / "test.index.json", tf, V.clip4clip_sampling(4))
    assert not test.multi_sentence and test.caption_to_video == list(range(len(test.videos)))

    msvd = VideoTextEval(world / TASK_DIRS["msvd"] / "test.index.json", tf, V.clip4clip_sampling(4))
    assert msvd.multi_sentence or len(msvd.videos) == 1 and len(msvd.captions) > 1


# -- the MSVD multi-sentence protocol -----------------------------------------------------------
def clip4clip_multi_sentence(sims: np.ndarray, counts: list[int]) -> dict[str, float]:
    """CLIP4Clip's `eval_epoch` with `multi_sentence_per_video`: the texts x videos matrix cut at the
    cut-off points into a videos x max_sentences x videos tensor padded with -inf, then
    `tensor_text_to_video_metrics` (rank of the own video per real sentence, torch.median) and
    `compute_metrics(tensor_video_to_text_sim(...))` (best sentence per candidate video)."""
    n_video, longest = len(counts), max(counts)
    stacked = np.full((n_video, longest, n_video), -np.inf)
    start = 0
    for g, c in enumerate(counts):
        stacked[g, :c] = sims[start:start + c]
        start += c
    t2v = np.array([int((stacked[g, s] > stacked[g, s, g]).sum()) for g in range(n_video) for s in range(counts[g])])
    group = stacked.max(axis=1).T  # [query video, caption group]
    v2t = np.array([int((group[v] > group[v, v]).sum()) for v in range(n_video)])
    out = {}
    for name, ranks, median in (("t2v", t2v, float(torch.median(torch.tensor(t2v + 1)))),
                                ("v2t", v2t, float(np.median(v2t) + 1))):
        out.update({f"{name}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10)})
        out[f"{name}_medr"], out[f"{name}_meanr"] = median, float(np.mean(ranks) + 1)
    return out


def test_msvd_multi_sentence_hand_made_case():
    # videos 0, 1, 2 with 2, 1 and 3 sentences; rows are sentences, columns videos
    sims = np.array([[0.9, 0.1, 0.2],   # v0 s0: rank 0
                     [0.3, 0.6, 0.1],   # v0 s1: rank 1 (video 1 first)
                     [0.2, 0.8, 0.5],   # v1 s0: rank 0
                     [0.4, 0.3, 0.2],   # v2 s0: rank 2
                     [0.1, 0.2, 0.7],   # v2 s1: rank 0
                     [0.5, 0.0, 0.45]]) # v2 s2: rank 1
    owner = [0, 0, 1, 2, 2, 2]
    m = evaluate_vtr(sims, owner)
    assert m["t2v_r1"] == pytest.approx(300 / 6) and m["t2v_r5"] == 100.0
    assert m["t2v_medr"] == 1.0  # ranks+1 = 1,1,1,2,2,3: torch.median takes the lower middle (1), not 1.5
    assert m["t2v_meanr"] == pytest.approx(10 / 6)
    # v2t: video v scores group g by max over g's sentences of sims[., v]:
    # v0: groups (0.9, 0.2, 0.5) -> rank 0; v1: (0.6, 0.8, 0.3) -> rank 0; v2: (0.2, 0.5, 0.7) -> rank 0
    assert m["v2t_r1"] == 100.0 and m["v2t_medr"] == 1.0
    assert m == pytest.approx({**clip4clip_multi_sentence(sims, [2, 1, 3]), "rsum": m["rsum"]})


def test_msvd_protocol_matches_the_official_pipeline_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(1, 6, size=int(rng.integers(2, 15))).tolist()
        sims = rng.standard_normal((sum(counts), len(counts)))
        owner = np.repeat(np.arange(len(counts)), counts)
        ours = evaluate_vtr(sims, owner, multi_sentence=True)
        assert {k: v for k, v in ours.items() if k != "rsum"} == pytest.approx(clip4clip_multi_sentence(sims, counts))


def test_msvd_protocol_through_the_deployed_model(tmp_path):
    from mdpd_vl.distill.config import DistillConfig
    from mdpd_vl.tasks.vtr_model import VTRConfig, build_vtr_model
    from mdpd_vl.tuning.config import MethodConfig

    index = write_videos(tmp_path, n_frames=[6, 3, 8, 5], captions_per_video=3)
    ev = VideoTextEval(index, clip_transform(SIDE), V.FrameSampling(max_frames=4))
    assert ev.multi_sentence and len(ev.captions) == 12
    torch.manual_seed(0)
    model = build_vtr_model(build_tiny_vit(), build_tiny_bert(),
                            MethodConfig(name="mdpd", d=8, distill=DistillConfig(d=8, backbone_trainable="head")),
                            VTRConfig(sim="seqTransf"))
    video_enc, text_enc = model.deployed()
    metrics, sims = encode_and_evaluate(video_enc, text_enc, ev, tokenize, batch_size=3)
    assert sims.shape == (12, 4)
    video_enc.eval()
    text_enc.eval()
    with torch.no_grad():  # the same numbers by hand: every video and caption encoded at once
        batch = Collator(None, None)([ev.videos[i] for i in range(4)])
        v = video_enc(batch["video"], batch["frame_mask"])
        t = torch.nn.functional.normalize(text_enc(tokenize(ev.captions)), dim=-1)
    assert np.allclose(sims, (t @ v.t()).numpy(), atol=1e-5)
    assert metrics == evaluate_vtr(sims, ev.caption_to_video)
    assert {k: x for k, x in metrics.items() if k != "rsum"} == pytest.approx(
        clip4clip_multi_sentence(sims, [3, 3, 3, 3]))
