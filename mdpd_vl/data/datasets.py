"""Datasets over the canonical index (`<split>.index.json`, written by `mdpd_vl.data.prep`).

Every dataset returns dicts. At training time an unreadable image or video is **skipped and
counted**: the next readable item is served instead, `dataset.skipped` grows by one, a warning
names the file (once; known-bad files are not decoded again), and the sample carries
`"skipped": 1` so that the collate function can add the count to the batch even when loading
happens in worker processes. Nothing is ever zero-filled silently.
Evaluation sets (`ImageTextEval`, `VideoTextEval`, `strict=True`) raise instead: dropping a test
item would change the metric.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mdpd_vl.data.cache import ArrayCache
from mdpd_vl.data.video import FrameSampling, read_clip
from mdpd_vl.errors import UserError

INDEX_FORMAT = "mdpd_vl.index"
INDEX_VERSION = 1
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "image_text": ("image", "captions"),
    "image_region": ("feature_file", "row", "captions"),
    "video_text": ("video", "captions"),
    "vqa": ("question_id", "image", "question", "answers"),
    "gqa": ("question_id", "image", "question", "answer"),
    "grounding": ("image", "sentence", "bbox_xyxy", "width", "height"),
}
# What a decoder raises for a missing, truncated or corrupt file (PIL, PyAV, decord, numpy); the
# readers below turn these into `_Unreadable`, the only error the skip policy catches.
UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, SyntaxError)


def load_index(path: str | Path, kind: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Read and validate a canonical index; every problem is a UserError naming the file and field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("index not found; run the data_prep script for this dataset", where=str(path)) from None
    except (OSError, ValueError) as err:
        raise UserError(f"not a readable JSON index ({err})", where=str(path)) from None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        raise UserError(f"not an mdpd_vl index (expected format {INDEX_FORMAT!r})", where=str(path), field="format")
    if data.get("version") != INDEX_VERSION:
        raise UserError(f"index version {data.get('version')!r}, this library reads {INDEX_VERSION}; "
                        "re-run the data_prep script with --force", where=str(path), field="version")
    if data.get("kind") not in KIND_FIELDS:
        raise UserError(f"unknown kind {data.get('kind')!r}; valid: {', '.join(KIND_FIELDS)}", where=str(path),
                        field="kind")
    wanted = (kind,) if isinstance(kind, str) else tuple(kind or ())
    if wanted and data["kind"] not in wanted:
        raise UserError(f"is a {data['kind']!r} index, expected {' or '.join(wanted)}", where=str(path), field="kind")
    items = data.get("items")
    if not isinstance(items, list) or not items:
        raise UserError("no items", where=str(path), field="items")
    for i, item in enumerate(items):
        missing = [f for f in KIND_FIELDS[data["kind"]] if not isinstance(item, dict) or f not in item]
        if missing:
            raise UserError(f"item {i} lacks {', '.join(missing)}", where=str(path), field=f"items[{i}]")
        for name in KIND_FIELDS[data["kind"]]:
            if (why := _field_problem(name, item[name])) is not None:
                raise UserError(f"{why}; re-run the data_prep script with --force", where=str(path),
                                field=f"items[{i}].{name}")
    if not isinstance(data.get("media_root"), str):
        raise UserError("no media_root", where=str(path), field="media_root")
    root = Path(data["media_root"])
    # a relative media_root is relative to the index, so that a data folder can be moved whole
    data["media_root"] = str(root if root.is_absolute() else (path.parent / root).resolve())
    data["path"] = str(path)
    return data


def _field_problem(name: str, value: Any) -> str | None:
    """Why an index field has the wrong type or shape (a hand-edited or foreign index), else None."""
    if name in ("image", "video", "feature_file", "question", "sentence") and not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if name == "captions" and not (isinstance(value, list) and value and all(isinstance(c, str) and c.strip()
                                                                                for c in value)):
        return "expected a non-empty list of non-blank strings"
    if name == "bbox_xyxy" and not (isinstance(value, list) and len(value) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        return "expected 4 finite numbers [x1, y1, x2, y2]"
    if name == "answers" and not isinstance(value, dict):
        return f"expected a mapping answer -> score, got {type(value).__name__}"
    return None


def _as_index(index: str | Path | Mapping[str, Any], kinds: Sequence[str]) -> dict[str, Any]:
    """A path is loaded and validated; a dict (e.g. from load_index) is taken as it is, kind checked."""
    if isinstance(index, (str, Path)):
        return load_index(index, kinds)
    if index.get("kind") not in kinds:
        raise UserError(f"is a {index.get('kind')!r} index, expected {' or '.join(kinds)}",
                        where=str(index.get("path", "index")), field="kind")
    return dict(index)


class _Unreadable(OSError):
    """An unreadable media file; `filename` names it for the skip report."""

    def __init__(self, message: str, filename: str):
        super().__init__(message)
        self.filename = filename

    def __str__(self) -> str:  # OSError would print "[Errno None] None: <filename>" and lose the reason
        return str(self.args[0]) if self.args else ""


class IndexDataset(Dataset):
    """Base: index handling, media paths, and the skip-and-count policy for unreadable media."""

    kinds: tuple[str, ...] = ()

    def __init__(self, index: str | Path | Mapping[str, Any], *, strict: bool = False, max_skips: int = 16,
                 seed: int = 0):
        self.index = _as_index(index, self.kinds)
        self.items: list[dict[str, Any]] = self.index["items"]
        self.root = Path(self.index["media_root"])
        self.strict, self.max_skips, self.seed = strict, max_skips, seed
        self.epoch = 0
        self.skipped = 0
        self.bad: dict[str, str] = {}

    def set_epoch(self, epoch: int) -> None:
        """Random choices (which caption) depend on (seed, epoch, item), so resuming replays them."""
        self.epoch = epoch

    def rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, i])

    def media(self, rel: str) -> Path:
        return self.root / rel

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int) -> dict[str, Any]:
        """Sample `i`; raises one of UNREADABLE when its media cannot be read."""
        raise NotImplementedError

    def item_of(self, j: int) -> int:
        """The index item behind sample `j` (pair datasets have several samples per item)."""
        return j

    def source(self, j: int) -> str:
        """The media file of sample `j` (the key of `self.bad`)."""
        item = self.items[self.item_of(j)]
        rel = next((item[k] for k in ("image", "video", "feature_file") if k in item), None)
        return str(self.media(rel)) if rel is not None else f"item {j}"

    def _note_bad(self, key: str, err: BaseException) -> None:
        if key not in self.bad:
            self.bad[key] = f"{type(err).__name__}: {err}"
            warnings.warn(f"skipping unreadable sample {key} ({self.bad[key]}); "
                          f"{len(self.bad)} bad file(s) so far", stacklevel=3)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample `i`, or (training) the next readable one; `skipped` is 1 when `i` itself was not."""
        n = len(self)
        for attempt in range(self.max_skips + 1):
            j = (i + attempt) % n
            key = self.source(j)
            try:
                if key in self.bad:  # known bad: do not decode it again
                    raise _Unreadable(self.bad[key], key)
                sample = self.load(j)
            except _Unreadable as err:  # only media errors: a bug in a transform must not be skipped
                if self.strict:
                    raise UserError(f"cannot read ({err})", where=key) from None
                self.skipped += attempt == 0  # substitutes that fail are counted when asked for
                self._note_bad(key, err)
                continue
            sample["skipped"] = int(attempt > 0)
            return sample
        raise RuntimeError(f"{self.max_skips + 1} unreadable samples in a row from item {i} of "
                           f"{self.index.get('path', 'the index')}; bad files: {list(self.bad)[:5]}")


def read_image(path: Path) -> Any:
    """Open and fully decode an RGB image (PIL decodes lazily; a broken file must fail here)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UNREADABLE as err:
        raise _Unreadable(f"{type(err).__name__}: {err}", str(path)) from None


class ImageTextPairs(IndexDataset):
    """Training pairs of an `image_text` (or `image_region`) index.

    `per="caption"`: one item per (image, caption); `per="image"`: one item per image with a
    caption drawn at random (seeded by seed, epoch and item). Returns `image` (or `regions`),
    `caption`, `image_index`, `caption_index`.
    """

    kinds = ("image_text", "image_region")

    def __init__(self, index, transform: Callable | None = None, *, per: str = "caption", **kw: Any):
        super().__init__(index, **kw)
        if per not in ("caption", "image"):
            raise ValueError("per must be 'caption' or 'image'")
        self.transform, self.per = transform, per
        self.pairs = [(i, k) for i, it in enumerate(self.items) for k in range(len(it["captions"]))]
        self._features: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.pairs) if self.per == "caption" else len(self.items)

    def item_of(self, j: int) -> int:
        return self.pairs[j][0] if self.per == "caption" else j

    def visual(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        if self.index["kind"] == "image_region":
            f = item["feature_file"]
            try:
                if f not in self._features:  # memory-mapped once per process (DataLoader workers too)
                    self._features[f] = np.load(self.media(f), mmap_mode="r", allow_pickle=False)
                rows = np.array(self._features[f][item["row"]], dtype=np.float32)
            except (*UNREADABLE, IndexError) as err:
                raise _Unreadable(f"{type(err).__name__}: {err}", str(self.media(f))) from None
            return {"regions": torch.from_numpy(rows)}
        img = read_image(self.media(item["image"]))
        return {"image": self.transform(img) if self.transform else img}

    def load(self, j: int) -> dict[str, Any]:
        if self.per == "caption":
            i, k = self.pairs[j]
        else:
            i = j
            k = int(self.rng(j).integers(len(self.items[i]["captions"])))
        return {**self.visual(i), "caption": self.items[i]["captions"][k], "image_index": i, "caption_index": k}


class _RetrievalEval:
    """Shared by the eval helpers: the flat caption list and its links to the media items."""

    def __init__(self, items: list[dict[str, Any]]):
        self.captions: list[str] = [c for it in items for c in it["captions"]]
        self.caption_to_item: list[int] = [i for i, it in enumerate(items) for _ in it["captions"]]
        self.item_to_captions: list[list[int]] = []
        k = 0
        for it in items:
            self.item_to_captions.append(list(range(k, k + len(it["captions"]))))
            k += len(it["captions"])


class _MediaOnly(Dataset):
    """All media of an eval split, once each: `{<key>: tensor, "index": i}`."""

    def __init__(self, source: IndexDataset, load: Callable[[int], dict[str, Any]]):
        self.source, self._load = source, load

    def __len__(self) -> int:
        return len(self.source.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {**self._load(i), "index": i}
        except _Unreadable as err:
            where = getattr(err, "filename", None) or f"item {i}"
            raise UserError(f"cannot read ({err}); evaluation needs every test item", where=str(where)) from None


class ImageTextEval(_RetrievalEval):
    """An eval split: `images` (a Dataset over every image once), `captions`, `caption_to_image`,
    `image_to_captions`. Unreadable images raise (strict)."""

    def __init__(self, index, transform: Callable | None = None):
        self.pairs = ImageTextPairs(index, transform, strict=True)
        super().__init__(self.pairs.items)
        self.images = _MediaOnly(self.pairs, self.pairs.visual)
        self.caption_to_image, self.image_to_captions = self.caption_to_item, self.item_to_captions


class VideoTextDataset(IndexDataset):
    """Training pairs of a `video_text` index: `video` (`T x 3 x H x W`, T <= max_frames),
    `frame_mask` (T bools), `caption`, `video_index`, `caption_index`, `short` (bool), and the wall
    times `decode_seconds` (file or frame cache -> uint8 frames) and `preprocess_seconds` (frames ->
    tensors), which the collate function stacks so a recipe can put decoding against model time.

    `per="caption"`: one sample per (video, caption), CLIP4Clip's MSVD training and MSR-VTT's
    `--expand_msrvtt_sentences`; `per="video"`: one sample per video with one of its captions drawn
    at random each time (MSR-VTT without expansion: `random.randint` in `_get_single_text`). The
    draw uses numpy's global RNG, which the engine seeds per (seed, epoch, item) in DataLoader workers
    and saves / restores with a checkpoint in the main process.

    Bad videos (no decoder can read them, no frames, or short under `short="skip"`) are skipped and
    counted (`skipped`, see IndexDataset); short videos that are kept follow `sampling.short` and
    are counted in `short_videos` (in this process; batches carry `short_videos` across workers).
    `cache` (an ArrayCache, or a folder for one) is the frame cache: sampled uint8 frames written
    once, so later epochs decode nothing."""

    kinds = ("video_text",)

    def __init__(self, index, transform: Callable, sampling: FrameSampling | None = None, *,
                 per: str = "caption", backend: str = "auto", cache: ArrayCache | str | Path | None = None,
                 **kw: Any):
        super().__init__(index, **kw)
        if per not in ("caption", "video"):
            raise ValueError("per must be 'caption' or 'video'")
        if isinstance(cache, (str, Path)):
            cache = ArrayCache(cache, namespace="frames")
        self.transform, self.per, self.backend, self.cache = transform, per, backend, cache
        self.sampling = sampling or FrameSampling()
        self.pairs = [(i, k) for i, it in enumerate(self.items) for k in range(len(it["captions"]))]
        self.short_videos = 0

    def __len__(self) -> int:
        return len(self.pairs) if self.per == "caption" else len(self.items)

    def item_of(self, j: int) -> int:
        return self.pairs[j][0] if self.per == "caption" else j

    def visual(self, i: int) -> dict[str, Any]:
        from mdpd_vl.data.transforms import frames_to_tensor

        path = self.media(self.items[i]["video"])
        try:
            clip = read_clip(path, self.sampling, backend=self.backend, cache=self.cache)
        except UNREADABLE as err:  # ShortVideo is a ValueError: skipped like a broken file
            raise _Unreadable(str(err), str(path)) from None
        self.short_videos += clip.short
        t0 = time.perf_counter()
        video = frames_to_tensor(clip.frames, self.transform)
        return {"video": video, "frame_mask": torch.ones(len(video), dtype=torch.bool), "short": clip.short,
                "decode_seconds": float(clip.decode_seconds), "preprocess_seconds": time.perf_counter() - t0}

    def load(self, j: int) -> dict[str, Any]:
        if self.per == "caption":
            i, k = self.pairs[j]
        else:
            i, k = j, int(np.random.randint(len(self.items[j]["captions"])))
        return {**self.visual(i), "caption": self.items[i]["captions"][k], "video_index": i, "caption_index": k}


class VideoTextEval(_RetrievalEval):
    """An eval split: `videos` (every video once), `captions`, `caption_to_video`, `video_to_captions`.
    Every test video must decode (strict): dropping one would change the metric. MSVD keeps all its
    sentences per video (CLIP4Clip's multi-sentence evaluation, `eval.video_retrieval`); the
    MSR-VTT JSFUSION 1k-A test has one sentence per video."""

    def __init__(self, index, transform: Callable, sampling: FrameSampling | None = None, **kw: Any):
        self.pairs = VideoTextDataset(index, transform, sampling, strict=True, **kw)
        super().__init__(self.pairs.items)
        self.videos = _MediaOnly(self.pairs, self.pairs.visual)
        self.caption_to_video, self.video_to_captions = self.caption_to_item, self.item_to_captions

    @property
    def multi_sentence(self) -> bool:
        """True when some video has more than one sentence (CLIP4Clip's `multi_sentence_per_video`)."""
        return any(len(c) > 1 for c in self.video_to_captions)


VOCAB_DIR = Path(__file__).parent / "vocab"
# the answer vocabularies CLIP-ViL trains with (clip-vil/CLIP-ViL: CLIP-ViL-Pretrain/data/{vqa,gqa}/
# trainval_ans2label.json), shipped with the library so that real runs need nothing else
REAL_VOCABS = {"vqav2": "vqa_trainval_ans2label.json", "gqa": "gqa_trainval_ans2label.json"}


def build_answer_vocab(indexes: Sequence[Mapping[str, Any]], min_count: int = 1) -> dict[str, int]:
    """Answer -> label over VQA (`answers` soft scores) or GQA (`answer`) items: answers seen in at
    least `min_count` questions, most frequent first (ties alphabetical)."""
    counts: dict[str, int] = {}
    for index in indexes:
        for item in index["items"]:
            answers = item["answers"] if "answers" in item else {item["answer"]: 1.0}
            for a in answers:
                if isinstance(a, str):  # GQA test questions have no answer (null)
                    counts[a] = counts.get(a, 0) + 1
    ranked = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(ranked)}


def load_answer_vocab(path: str | Path) -> dict[str, int]:
    """An answer vocabulary file: `{answer: label}` (trainval_ans2label.json) or `[answer, ...]`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("answer vocabulary not found", where=str(path), field="vocab") from None
    except (OSError, ValueError) as err:
        raise UserError(f"not a readable JSON vocabulary ({err})", where=str(path), field="vocab") from None
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        data = {a: i for i, a in enumerate(data)}
    if not (isinstance(data, dict) and data and all(isinstance(v, int) for v in data.values())):
        raise UserError("expected {answer: label} or [answer, ...]", where=str(path), field="vocab")
    if sorted(data.values()) != list(range(len(data))):
        raise UserError("labels must be 0..N-1, each once", where=str(path), field="vocab")
    return dict(data)


def real_answer_vocab(dataset: str) -> dict[str, int]:
    """CLIP-ViL's answer vocabulary of `dataset` ('vqav2': 3,129 answers, 'gqa': 1,842)."""
    if dataset not in REAL_VOCABS:
        raise UserError(f"no shipped vocabulary for {dataset!r}; valid: {', '.join(REAL_VOCABS)}", field="vocab")
    return load_answer_vocab(VOCAB_DIR / REAL_VOCABS[dataset])


def label_to_answer(vocab: Mapping[str, int]) -> list[str]:
    """The answer string of every label (the inverse of an answer vocabulary)."""
    out = [""] * len(vocab)
    for answer, label in vocab.items():
        out[label] = answer
    return out


class _QuestionSet(IndexDataset):
    """Shared by VQA and GQA: questions whose image file is missing are dropped and counted
    (`missing_images`); answers outside the vocabulary are counted (`oov_answers`)."""

    def __init__(self, index, transform: Callable | None, answer_to_label: Mapping[str, int] | None,
                 drop_missing: bool = True, **kw: Any):
        super().__init__(index, **kw)
        self.transform, self.vocab = transform, answer_to_label
        self.missing_images = 0
        if drop_missing:
            present: dict[str, bool] = {}
            kept = []
            for item in self.items:
                rel = item["image"]
                if rel not in present:  # one stat per image, not per question
                    present[rel] = self.media(rel).is_file()
                if present[rel]:
                    kept.append(item)
            self.missing_images = len(self.items) - len(kept)
            if self.missing_images:
                missing = sum(not ok for ok in present.values())
                warnings.warn(f"{self.index.get('path', 'index')}: {self.missing_images} question(s) skipped, "
                              f"their {missing} image file(s) are missing", stacklevel=3)
            if not kept:
                raise UserError(f"every image is missing under {self.root}", where=self.index.get("path"),
                                field="media_root")
            self.items = kept

    def counts(self) -> dict[str, int]:
        """What was skipped or fell outside the vocabulary (for the run's report)."""
        return {"questions": len(self.items), "missing_images": self.missing_images,
                "oov_answers": self.oov_answers, **self._extra_counts()}

    def _extra_counts(self) -> dict[str, int]:
        return {}

    def _image(self, item: Mapping[str, Any]) -> Any:
        img = read_image(self.media(item["image"]))
        return self.transform(img) if self.transform else img


class VQADataset(_QuestionSet):
    """`vqa` items: `image`, `question`, `question_id`, `answers` (soft scores) and, with a vocabulary,
    `target` (a `len(vocab)` float vector of soft scores). An answer outside the vocabulary is
    dropped from the target and counted (`oov_answers`); a question left without any is kept with
    an all-zero target, as in LXMERT, and counted (`unanswerable`): it scores zero when evaluated."""

    kinds = ("vqa",)

    def __init__(self, index, transform: Callable | None = None, answer_to_label: Mapping[str, int] | None = None,
                 **kw: Any):
        super().__init__(index, transform, answer_to_label, **kw)
        self.oov_answers = self.unanswerable = 0
        if self.vocab is not None:
            for item in self.items:
                known = [a for a, score in item["answers"].items() if score > 0 and a in self.vocab]
                self.oov_answers += sum(1 for a, score in item["answers"].items() if score > 0) - len(known)
                self.unanswerable += bool(item.get("raw_answers")) and not known

    def _extra_counts(self) -> dict[str, int]:
        return {"unanswerable": self.unanswerable}

    def load(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        out = {"image": self._image(item), "question": item["question"], "question_id": item["question_id"],
               "answers": dict(item["answers"])}
        if self.vocab is not None:
            out["target"] = soft_target(item["answers"], self.vocab)
        return out


def soft_target(answers: Mapping[str, float], vocab: Mapping[str, int]) -> torch.Tensor:
    """The `len(vocab)` soft-score vector of one question (answers outside `vocab` dropped)."""
    target = torch.zeros(len(vocab))
    for a, score in answers.items():
        if a in vocab:
            target[vocab[a]] = float(score)
    return target


class GQADataset(_QuestionSet):
    """`gqa` items: `image`, `question`, `question_id`, `answer`, `label` (-1 when outside the
    vocabulary or none given; outside ones are counted in `oov_answers`), `structural`, `is_balanced`."""

    kinds = ("gqa",)

    def __init__(self, index, transform: Callable | None = None, answer_to_label: Mapping[str, int] | None = None,
                 **kw: Any):
        super().__init__(index, transform, answer_to_label or {}, **kw)
        self.oov_answers = sum(1 for it in self.items if isinstance(it["answer"], str) and it["answer"]
                               and it["answer"] not in self.vocab) if answer_to_label else 0

    def load(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        return {"image": self._image(item), "question": item["question"],
                "question_id": item["question_id"], "answer": item["answer"],
                "label": self.vocab.get(item["answer"], -1), "structural": item.get("structural"),
                "is_balanced": bool(item.get("is_balanced", True))}


class GroundingDataset(IndexDataset):
    """`grounding` items: `image`, `sentence`, `box` (the target as normalised cx, cy, w, h in [0, 1]),
    `bbox_xyxy` (pixels of the original image), `orig_size` (h, w), ids.

    Bad annotations never crash a run; at construction they are counted in `problems` (a warning sums them up):
    - `clipped`: a box reaching outside the image is clipped to it (kept);
    - `degenerate`: zero width or height (after clipping): skipped;
    - `no_annotation`: no box (missing, null, not four finite numbers) or no positive image size: skipped;
    - `blank_sentence`: no expression text: skipped;
    - `missing_image`: the image file does not exist (checked once per file): skipped.
    `transform` is either a plain image transform that must not crop (`transforms.box_transform`), or a
    `transforms.GroundingTransform`, which receives and returns the box (and the sentence) with the image."""

    kinds = ("grounding",)
    PROBLEMS = ("clipped", "degenerate", "no_annotation", "blank_sentence", "missing_image")

    def __init__(self, index, transform: Callable | None = None, *, check_images: bool = True, **kw: Any):
        super().__init__(index, **kw)
        self.transform = transform
        self.problems = dict.fromkeys(self.PROBLEMS, 0)
        self.examples: dict[str, str] = {}
        kept, exists = [], {}
        for i, item in enumerate(self.items):
            problem, box = _grounding_box(item)
            if problem is None and check_images:
                rel = item["image"]
                if rel not in exists:
                    exists[rel] = isinstance(rel, str) and self.media(rel).is_file()
                problem = None if exists[rel] else "missing_image"
            if problem == "clipped":
                self.problems["clipped"] += 1
                self.examples.setdefault("clipped", f"item {i}: {item.get('bbox_xyxy')} -> {box}")
                problem = None
            if problem is not None:
                self.problems[problem] += 1
                self.examples.setdefault(problem, f"item {i} ({item.get('image')}): {item.get('bbox_xyxy')}")
                continue
            kept.append({**item, "bbox_xyxy": box})
        if any(self.problems.values()):
            warnings.warn(f"{self.index.get('path', 'grounding index')}: " + ", ".join(
                f"{k} {v} (e.g. {self.examples[k]})" for k, v in self.problems.items() if v), stacklevel=2)
        if not kept:
            raise UserError("no usable referring expression (every item was skipped: "
                            f"{self.problems})", where=str(self.index.get("path", "index")), field="items")
        self.items = kept

    def load(self, i: int) -> dict[str, Any]:
        from torchvision.ops import box_convert

        item = self.items[i]
        img = read_image(self.media(item["image"]))
        w, h = float(item["width"]), float(item["height"])
        xyxy = torch.tensor(item["bbox_xyxy"], dtype=torch.float32)
        box = box_convert(xyxy[None], "xyxy", "cxcywh")[0] / torch.tensor([w, h, w, h])
        sentence = item["sentence"]
        if getattr(self.transform, "carries_boxes", False):
            image, box, sentence = self.transform(img, box, sentence)  # type: ignore[misc]
        else:
            image = self.transform(img) if self.transform else img
        return {"image": image, "sentence": sentence, "box": box, "bbox_xyxy": xyxy,
                "orig_size": torch.tensor([int(h), int(w)]), "ref_id": item.get("ref_id"),
                "sent_id": item.get("sent_id"), "image_id": item.get("image_id")}


def _grounding_box(item: Mapping[str, Any]) -> tuple[str | None, list[float] | None]:
    """(problem or None, the box clipped to the image) of one grounding item; problem 'clipped' keeps it."""
    from torchvision.ops import clip_boxes_to_image

    if not isinstance(item.get("sentence"), str) or not item["sentence"].strip():
        return "blank_sentence", None
    try:
        w, h = float(item["width"]), float(item["height"])
        box = torch.tensor([float(v) for v in item["bbox_xyxy"]], dtype=torch.float64)
    except (TypeError, ValueError, KeyError):
        return "no_annotation", None
    if box.shape != (4,) or not bool(torch.isfinite(box).all()) or not (w > 0 and h > 0):
        return "no_annotation", None
    clipped = clip_boxes_to_image(box[None], (h, w))[0]
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        return "degenerate", None
    return ("clipped" if not torch.equal(clipped, box) else None), clipped.tolist()
