"""What only VTR needs around its recipe: video-text data (live frames, or the frozen backbones'
per-frame features cached), the deployed retriever, CLIP4Clip's evaluation, the efficiency batch,
and VTR's tables and card words.

Everything task-independent (results schema, efficiency block, export, card, `--compare`, the
end-of-run summary) is in `mdpd_vl.tasks.kit`.

Frozen-feature cache (`data.cache_features`, exact for methods whose backbone never changes, see
`kit.frozen_features_exact`): every sampled frame of every training video goes once through the
frozen image backbone and every caption once through the text backbone; the per-layer features are
stored as float16 (`backbones/cache.py`) with a small JSON of the frames per video, and each epoch
reads them. The eval split's features are computed once per run (float32, batched as the deployed
retriever batches), so evaluations give the numbers of live passes.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from mdpd_vl.backbones.base import Precomputed
from mdpd_vl.backbones.cache import FeatureStore, cache_key, cached_features
from mdpd_vl.cards import markdown_table
from mdpd_vl.data import retrieval_inputs as ri
from mdpd_vl.data.cache import ArrayCache
from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import VideoTextDataset, VideoTextEval
from mdpd_vl.data.transforms import clip_transform, transform_stats
from mdpd_vl.data.video import FrameSampling
from mdpd_vl.deploy.retrieval import encode_batches
from mdpd_vl.deploy.video import VideoTextRetriever, frozen_video_inputs, video_preprocess
from mdpd_vl.errors import UserError
from mdpd_vl.eval.video_retrieval import evaluate_vtr
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks.vtr_model import VideoTextRetrieval

if TYPE_CHECKING:
    from mdpd_vl.tasks.vtr import VTRTaskConfig


def sampling(cfg: VTRTaskConfig) -> FrameSampling:
    """The frames every split reads: CLIP4Clip's (`fps` per second, `linspace` down to `max_frames`)."""
    d = cfg.data
    return FrameSampling(max_frames=d.max_frames, fps=d.fps, slice_framepos=d.slice_framepos, short=d.short)


def frame_transform(backbone: Any, size: int | None) -> Any:
    """The backbone's own preprocessing, at `size` pixels when given (same mean/std): every frame."""
    own = backbone.transform(False)
    if size is None:
        return own
    stats = transform_stats(own) or {}
    return clip_transform(size, **{k: stats[k] for k in ("mean", "std") if k in stats})


def per_caption(cfg: VTRTaskConfig) -> bool:
    """One training sample per (video, caption): MSVD always, MSR-VTT with `expand_sentences`
    (CLIP4Clip's `--expand_msrvtt_sentences`); else one per video with a caption drawn each time."""
    d = cfg.data
    msvd = d.dataset == "msvd" or (d.dataset == "shapes" and d.shapes_protocol == "msvd")
    return d.expand_sentences or msvd


@dataclass
class DataStats:
    """What the training data did: videos skipped (unreadable, empty, or short under `short=skip`), short
    videos kept (masked), and where the time of reading went."""

    skipped_videos: int = 0  # distinct training videos that could not be used
    skipped_samples: int = 0  # training samples served by a substitute (a skipped video asked for)
    short_videos: int = 0  # training samples of a video with fewer frames than max_frames (kept, masked)
    bad_files: dict[str, str] = field(default_factory=dict)
    features_reused: bool = False  # the frozen features came from an earlier run's cache: nothing decoded
    decode_s: float = 0.0  # wall seconds reading frames (decode or frame cache), summed over samples
    preprocess_s: float = 0.0  # wall seconds frames -> tensors, summed over samples

    def add_batch(self, batch: dict[str, Any]) -> None:
        self.skipped_samples += int(batch.get("skipped", 0))
        self.short_videos += int(batch.get("short_videos", 0))
        for key, attr in (("decode_seconds", "decode_s"), ("preprocess_seconds", "preprocess_s")):
            if key in batch:
                setattr(self, attr, getattr(self, attr) + float(torch.as_tensor(batch[key]).sum()))

    def record(self) -> dict[str, Any]:
        return {"skipped_videos": self.skipped_videos, "skipped_samples": self.skipped_samples,
                "short_videos": self.short_videos, "bad_files": dict(list(self.bad_files.items())[:20]),
                "features_reused": self.features_reused,
                "decode_s": round(self.decode_s, 2), "preprocess_s": round(self.preprocess_s, 2)}


@dataclass
class VideoData:
    """The training set + collate (live frames, or cached frozen features) and the eval split."""

    train_set: Any
    collate: Any
    evalset: VideoTextEval
    video_paths: list[Path]
    tokenize: Any
    cached: bool
    cache_dir: Path | None
    frame_cache: ArrayCache | None
    stats: DataStats
    live_train: VideoTextDataset | None = None
    eval_inputs: tuple[list[dict[str, Any]], list[Precomputed]] | None = None

    @property
    def multi_sentence(self) -> bool:
        return self.evalset.multi_sentence

    def freeze_eval_inputs(self, retr: VideoTextRetriever) -> None:
        """The eval split's frozen per-layer features, computed once, batched as `retr` batches."""
        texts = [Precomputed(list(f), m) for f, m in _text_features(retr.text_backbone,
                                                                    retr.text_inputs(self.evalset.captions))]
        self.eval_inputs = (frozen_video_inputs(retr.image_backbone, retr.video_inputs(self.video_paths)), texts)

    def finish(self) -> None:
        """Fold in what the live training dataset counted (distinct bad files), over all processes:
        each one counted the batches it read."""
        if self.live_train is not None:
            s = self.stats
            parts = kit.all_gather((s.skipped_samples, s.short_videos, s.decode_s, s.preprocess_s, self.live_train.bad))
            s.skipped_samples, s.short_videos = sum(p[0] for p in parts), sum(p[1] for p in parts)
            s.decode_s, s.preprocess_s = sum(p[2] for p in parts), sum(p[3] for p in parts)
            for p in parts:
                s.bad_files.update(p[4])
            self.stats.skipped_videos = len(self.stats.bad_files)

    @classmethod
    def build(cls, cfg: VTRTaskConfig, model: VideoTextRetrieval, folder: Path) -> VideoData:
        img_bb, txt_bb = model.video.backbone, model.text.backbone
        transform, frames = frame_transform(img_bb, cfg.data.image_size), sampling(cfg)
        root = common.data_root(cfg.data.root)
        cache = common.cache_dir(cfg.data.cache_dir, root)
        frame_cache = ArrayCache(cache, namespace="frames") if cfg.data.frame_cache else None

        def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
            return txt_bb.tokenize(texts, max_length=cfg.data.max_text_len)

        evalset = VideoTextEval(folder / f"{cfg.data.eval_split}.index.json", transform, frames,
                                backend=cfg.data.backend, cache=frame_cache)
        paths = [evalset.pairs.media(item["video"]) for item in evalset.pairs.items]
        train = VideoTextDataset(folder / f"{cfg.data.train_split}.index.json", transform, frames,
                                 per="caption" if per_caption(cfg) else "video", backend=cfg.data.backend,
                                 cache=frame_cache, seed=cfg.train.seed)
        stats = DataStats()
        cached = cfg.data.cache_features and kit.frozen_features_exact(cfg.method)
        if cached:
            key = {"dataset": cfg.data.dataset, "folder": str(folder.resolve()), "size": cfg.data.image_size,
                   "frames": str(frames), "max_text_len": cfg.data.max_text_len, "split": cfg.data.train_split,
                   "index": _stamp(folder / f"{cfg.data.train_split}.index.json")}
            with kit.main_first():  # the main process caches (features + frame counts), the others read
                train_set, collate = _cached_train(train, img_bb, txt_bb, tokenize, cache, key,
                                                   cfg.data.eval_batch_size, stats)
            live = None
        else:
            train_set, collate, live = train, Collator(tokenize, text_key="caption"), train
            cache = None
        if cfg.data.max_train_samples is not None:
            train_set = Subset(train_set, range(min(cfg.data.max_train_samples, len(train_set))))
        return cls(train_set, collate, evalset, paths, tokenize, cached, cache, frame_cache, stats, live)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@torch.no_grad()
def _text_features(backbone: Any, batches: Any) -> list[tuple[list[torch.Tensor], torch.Tensor | None]]:
    was = backbone.training
    backbone.eval()
    try:
        with_input = getattr(backbone, "input_spec", None) is not None
        return [(backbone.features(x, with_input=with_input), backbone.padding_mask(x)) for x in batches]
    finally:
        backbone.train(was)


# ----------------------------------------------------------------------------- the frozen-feature cache
class CachedVideoPairs(Dataset):
    """Training samples over the cached split: `row` (a usable video), `caption_flat` (a caption row)."""

    def __init__(self, captions: list[list[int]], video_ids: list[int], per_caption: bool):
        self.captions, self.video_ids, self.per_caption = captions, video_ids, per_caption
        self.pairs = [(r, c) for r, caps in enumerate(captions) for c in caps]

    def __len__(self) -> int:
        return len(self.pairs) if self.per_caption else len(self.captions)

    def __getitem__(self, j: int) -> dict[str, int]:
        if self.per_caption:
            row, cap = self.pairs[j]
        else:  # one caption drawn per video and epoch, as VideoTextDataset(per="video") draws it
            row = j
            cap = self.captions[j][int(np.random.randint(len(self.captions[j])))]
        return {"row": row, "caption_flat": cap, "video_index": self.video_ids[row]}


class CachedVideoCollate:
    """Batches of cached samples: the valid frames' features of each video in order (`Precomputed`),
    `frame_mask` (B x T), the captions' features, `video_index`."""

    def __init__(self, frames: FeatureStore, counts: list[int], texts: FeatureStore):
        self.frames, self.texts = frames, texts
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def __call__(self, items: list[dict[str, int]]) -> dict[str, Any]:
        rows = [it["row"] for it in items]
        counts = self.counts[rows]
        mask = torch.zeros(len(rows), int(counts.max()), dtype=torch.bool)
        for b, n in enumerate(counts):
            mask[b, :n] = True
        frame_rows = np.concatenate([np.arange(self.offsets[r], self.offsets[r] + self.counts[r]) for r in rows])
        return {"video": self.frames.get(frame_rows.tolist()), "frame_mask": mask,
                "text": self.texts.get([it["caption_flat"] for it in items]),
                "video_index": torch.tensor([it["video_index"] for it in items])}


def _cached_train(train: VideoTextDataset, img_bb: Any, txt_bb: Any, tokenize: Any, folder: Path,
                  key: dict[str, Any], batch_size: int, stats: DataStats) -> tuple[Dataset, CachedVideoCollate]:
    """Cache the training split's frame and caption features (or load them); bad videos are skipped
    and counted once, here, for every epoch (the counts are stored beside the features)."""
    counts_file = Path(folder) / f"frames-{cache_key(img_bb, {**key, 'part': 'frames'})}.json"
    try:
        counts = json.loads(counts_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        counts = None
    found: dict[str, Any] = {"frames": [], "short": 0, "bad": {}}

    def frame_batches() -> Any:  # consumed only when the features are not cached yet
        found.update(frames=[], short=0, bad={})
        pending: list[torch.Tensor] = []
        for i in range(len(train.items)):
            sample = _read_video(train, i, found["bad"])
            found["frames"].append(0 if sample is None else len(sample["video"]))
            if sample is not None:
                found["short"] += bool(sample["short"])
                stats.decode_s += sample["decode_seconds"]
                stats.preprocess_s += sample["preprocess_seconds"]
                pending.append(sample["video"])
            if pending and (sum(len(p) for p in pending) >= batch_size or i == len(train.items) - 1):
                yield torch.cat(pending)
                pending = []

    frames, hit = cached_features(img_bb, frame_batches(), folder, {**key, "part": "frames"},
                                  desc="caching frame features")
    if counts is None or not hit:
        if hit:  # features stored by a run that stopped before it wrote their frame counts: count again
            for _ in frame_batches():
                pass
        counts = dict(found)
        kit.on_main(common.write_json, counts_file, counts)
    stats.features_reused = hit and not found["frames"]
    if sum(counts["frames"]) != len(frames):
        raise RuntimeError(f"the frame features cached in {folder} disagree with {counts_file.name}; "
                           f"delete both and run again")
    kept = [i for i, n in enumerate(counts["frames"]) if n > 0]
    if not kept:
        raise UserError("no training video could be read (see the warnings above)",
                        where=str(train.index.get("path", "train index")))
    stats.bad_files.update(counts["bad"])
    stats.skipped_videos = len(train.items) - len(kept)
    stats.short_videos = int(counts["short"])
    captions: list[list[int]] = []
    flat: list[str] = []
    for i in kept:
        caps = train.items[i]["captions"]
        captions.append(list(range(len(flat), len(flat) + len(caps))))
        flat.extend(caps)
    texts, _ = cached_features(txt_bb, ri.caption_batches(flat, tokenize, batch_size), folder,
                               {**key, "part": "captions", "videos": len(kept)}, desc="caching caption features")
    pairs = CachedVideoPairs(captions, kept, train.per == "caption")
    return pairs, CachedVideoCollate(frames, [counts["frames"][i] for i in kept], texts)


def _read_video(train: VideoTextDataset, i: int, bad: dict[str, str]) -> dict[str, Any] | None:
    """Video `i`'s frames, or None (recorded in `bad`, warned once) when it cannot be used: no decoder
    reads it, it has no frames, or it is short under `short="skip"` (the dataset's own skip rule)."""
    path = str(train.media(train.items[i]["video"]))
    try:
        return train.visual(i)
    except OSError as err:  # the dataset's unreadable-media error (short-under-skip included)
        bad[path] = str(err)
        warnings.warn(f"skipping unreadable training video {path} ({err}); {len(bad)} so far", stacklevel=2)
        return None


# ----------------------------------------------------------------------------- deployed model, evaluation
def retriever(model: VideoTextRetrieval, cfg: VTRTaskConfig, data: VideoData | None = None,
              side_kept: bool = False) -> VideoTextRetriever:
    """The deployed (or side-kept) encoders with the evaluation's preprocessing: what the export holds."""
    img_bb, txt_bb = model.video.backbone, model.text.backbone
    d = cfg.data
    preprocess = video_preprocess(sampling(cfg), d.image_size, img_bb, d.max_text_len, d.eval_batch_size, d.backend)
    video, text = model.deployed(side_kept=side_kept)
    return VideoTextRetriever(video, text, preprocess, img_bb, txt_bb, data.frame_cache if data else None)


def evaluate(retr: VideoTextRetriever, data: VideoData) -> dict[str, float]:
    """CLIP4Clip's metrics of `retr` on the eval split (`eval.video_retrieval.evaluate_vtr`: t2v over
    every sentence, v2t over caption groups, MSVD's multi-sentence median), videos read from their files
    or, with a frozen backbone, from their features computed once."""
    if data.eval_inputs is not None:
        vid, txt = encode_batches(retr.video, data.eval_inputs[0]), encode_batches(retr.text, data.eval_inputs[1])
    else:
        vid, txt = retr.encode_videos(data.video_paths), retr.encode_texts(data.evalset.captions)
    sims = (txt @ vid.t()).numpy()
    metrics = evaluate_vtr(sims, data.evalset.caption_to_video, data.multi_sentence)
    return {k: round(float(v), 2) for k, v in metrics.items()}


def efficiency(model: VideoTextRetrieval, data: VideoData, cfg: VTRTaskConfig, deployed: VideoTextRetriever,
               rounds: int = 3) -> dict[str, Any]:
    """The kit's efficiency block on one live batch of test videos (their frames decoded and
    transformed as the export does) and one caption each (<= 16 pairs): the same batch for every method."""
    n = min(cfg.train.batch_size, 16, len(data.video_paths))
    video = next(deployed.video_inputs(data.video_paths[:n], batch_size=n))
    text = data.tokenize([data.evalset.captions[data.evalset.video_to_captions[i][0]] for i in range(n)])
    batch = {**video, "text": text, "video_index": torch.arange(n)}
    params = [p for group in model.param_groups().values() for p in group]

    def closure() -> torch.Tensor:
        return sum(model.losses(batch).values())

    def pair(vid: torch.nn.Module, txt: torch.nn.Module) -> Any:
        vid.eval(), txt.eval()
        return lambda: (vid(video), txt(text))

    side = model.deployed(side_kept=True) if model.is_mdpd else None
    timed = {"deployed": pair(deployed.video, deployed.text), "bare": pair(*model.bare()),
             "side_kept": pair(*side) if side is not None else None}
    return kit.efficiency(kit.TrainStep(model, closure, params, batch, n), timed, n, rounds=rounds,
                          trainable_params=model.trainable_params, inference_params=model.inference_params(),
                          inference_params_side_kept=model.inference_params(side_kept=True) if side else None)


# ----------------------------------------------------------------------------- VTR's tables and card
def metrics_table(results: dict[str, Any]) -> str:
    """T2V / V2T R@1/5/10, MdR, MnR, Rsum, inference parameters and QPS per deployment, the bare
    backbones' QPS, then what the data did (skipped / short videos, reading time against model time)."""
    eff = results["efficiency"]
    deployments = [("deployed" if results["method"] != "mdpd" else "faded (deployed)", results["metrics"],
                    eff["inference_params"], eff["infer_qps"])]
    if results.get("metrics_side_kept"):
        deployments.append(("side kept", results["metrics_side_kept"], eff["inference_params_side_kept"],
                            eff["infer_qps_side_kept"]))
    rows = []
    for name, m, params, qps in deployments:
        row: dict[str, Any] = {"model": name}
        for side, label in (("t2v", "T2V"), ("v2t", "V2T")):
            row.update({f"{label} R@1": m[f"{side}_r1"], f"{label} R@5": m[f"{side}_r5"],
                        f"{label} R@10": m[f"{side}_r10"], f"{label} MdR": m[f"{side}_medr"],
                        f"{label} MnR": m[f"{side}_meanr"]})
        rows.append({**row, "Rsum": m["rsum"], "infer params (M)": round(params / 1e6, 2), "QPS": qps})
    rows.append({"model": "bare backbones (reference)", "infer params (M)": "-", "QPS": eff.get("infer_qps_bare") or "-"})
    before = (results.get("metrics_before_training") or {}).get("rsum")
    notes = [f"Rsum before training {before}" + ("; trained on cached frozen features" if results["cached_features"]
                                                 else ""), data_line(results)]
    return markdown_table(rows) + "\n\n" + "\n".join(notes)


def data_line(results: dict[str, Any]) -> str:
    """Skipped and short training videos, and the time spent reading frames against the model's time."""
    s, t = results["data_stats"], results["timings"]["phases"]
    train_s = t.get("training", {}).get("wall_s", 0.0)
    reading = s["decode_s"] + s["preprocess_s"]
    workers = results["config"]["train"]["num_workers"]
    where = ("while caching the features (once; epochs read no frames)" if results["cached_features"]
             else f"during training ({workers} DataLoader workers)")
    if s.get("features_reused"):
        where = "(none: the frozen features of an earlier run were read from the cache)"
    model_s = f"; model (forward, backward, step) about {max(train_s - reading, 0.0):.1f} s of the {train_s:.1f} s" \
        if not results["cached_features"] and workers == 0 else \
        f"; training {train_s:.1f} s"
    bad = f" ({', '.join(list(s['bad_files'])[:3])}{', ...' if len(s['bad_files']) > 3 else ''})" if s["bad_files"] else ""
    return (f"training videos skipped: {s['skipped_videos']}{bad}, samples substituted: {s['skipped_samples']}, "
            f"short videos kept (frames masked): {s['short_videos']}; reading frames {s['decode_s']:.1f} s "
            f"(decode or frame cache) + {s['preprocess_s']:.1f} s (transforms) {where}{model_s}")


def use_snippet(export_dir: Path | None, data: VideoData) -> str:
    """The card's "Use" code: reload the export, embed two test videos and a caption, compare."""
    if export_dir is None:
        return ("# not exported: this method's deployed towers are not a plain backbone + head\n"
                "# (side-kept networks and unmergeable adapters change the backbone)")
    videos = [kit.shown_path(data.video_paths[0]), kit.shown_path(data.video_paths[-1])]
    caption = data.evalset.captions[data.evalset.video_to_captions[0][0]]
    return (f"from mdpd_vl.export import load_exported\n\n"
            f"model = load_exported({kit.shown_path(export_dir)!r})  # frame + text encoders, similarity head, "
            f"frame sampling and preprocessing\n"
            f"videos = model.encode_videos({videos!r})  # video files -> L2-normalised embeddings\n"
            f"texts = model.encode_texts([{caption!r}])\n"
            f"print(texts @ videos.T)  # cosine similarities; the caption describes the first video")


def write_card(out: Path, results: dict[str, Any], data: VideoData) -> Path:
    """MODEL_CARD.md of a VTR run."""
    export_dir = Path(results["export_dir"]) if results["export_dir"] else None
    protocol = "multi-sentence (every caption a query, CLIP4Clip's MSVD protocol)" if data.multi_sentence \
        else "one sentence per video"
    return kit.write_card(
        out, results, title=f"VTR {results['method']} on {results['dataset']}", task_words="video-text retrieval",
        deployed_summary=f"a per-frame video encoder (backbone + CLIP projection, then the "
                         f"`{results['config']['vtr']['sim']}` similarity head) and a text encoder (backbone + "
                         f"projection), with the frame sampling and preprocessing they were evaluated with; no side "
                         f"network.",
        metrics_table=metrics_table(results), use_snippet=use_snippet(export_dir, data),
        objective=results["objective"], data=f"{results['dataset']}, trained on `{results['config']['data']['train_split']}`; test protocol: {protocol}.")
