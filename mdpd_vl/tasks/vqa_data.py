"""What only VQA needs around its recipe: the question splits, the answer vocabulary, the training
inputs (live images, cached image grids, or cached encoder features) and the evaluation inputs.

The bad-input policy (issue 14): a question whose image file is missing is dropped and counted
(`missing_images`); an image that exists but cannot be decoded drops its questions too
(`unreadable_images`); an answer outside the vocabulary is counted (`oov_answers`) and, since no
label can predict it, scores zero under the official protocols. The counts go to results.json.

Caches (each exact for the methods it serves; see tasks/vqa.md):
- image grids: the image backbone is frozen and in eval mode in every method compared here, so the
  grid tokens of each training image are computed once and kept in memory (`data.cache_grids`);
- encoder features: with a frozen encoder too (linear, the side-kept methods, MDPD `head`), every
  layer of the joint sequence is computed once and stored on disk (`data.cache_features`, float16);
- evaluation: the eval split's grids are computed once through the deployed answerer's own
  batching, and, with a frozen encoder, its per-layer features too, so that every evaluation of the
  run reads them and gives the answers of live passes bit for bit.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from mdpd_vl.backbones.base import Precomputed
from mdpd_vl.backbones.crossmodal import CrossModalBackbone
from mdpd_vl.data.collate import Collator
from mdpd_vl.data.datasets import (
    UNREADABLE,
    GQADataset,
    VQADataset,
    build_answer_vocab,
    load_answer_vocab,
    load_index,
    read_image,
    real_answer_vocab,
    soft_target,
)
from mdpd_vl.deploy.vqa import VisualQuestionAnswerer
from mdpd_vl.errors import UserError

MINIVAL_SPLITS = ("minival", "nominival")  # LXMERT's split of VQAv2 val (data/vqa/minival.json)


# ----------------------------------------------------------------------------- splits and vocabulary
def minival_ids(path: str | Path | None, split: str) -> set[str]:
    """Question ids of LXMERT's `minival.json` (a list of question objects or of ids), as strings."""
    if path is None:
        raise UserError(f"the {split} split needs LXMERT's minival.json (its question ids): "
                        "--set data.minival_file=FILE", field="data.minival_file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError("minival file not found", where=str(path), field="data.minival_file") from None
    except (OSError, ValueError) as err:
        raise UserError(f"not a readable JSON list ({err})", where=str(path), field="data.minival_file") from None
    if not isinstance(data, list) or not data:
        raise UserError("expected a list of question ids or of objects with 'question_id'", where=str(path))
    ids = set()
    for d in data:
        qid = d.get("question_id") if isinstance(d, dict) else d
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise UserError("every entry must be a question id or an object with 'question_id'", where=str(path),
                            field="data.minival_file")
        ids.add(str(qid))
    return ids


def split_index(folder: Path, split: str, kind: str, minival_file: str | None = None) -> dict[str, Any]:
    """The canonical index of `split`; `minival` / `nominival` are val filtered by LXMERT's ids."""
    if split in MINIVAL_SPLITS and kind == "vqa":
        index = load_index(folder / "val.index.json", kind)
        ids = minival_ids(minival_file, split)
        keep = split == "minival"
        index["items"] = [it for it in index["items"] if (str(it["question_id"]) in ids) == keep]
        index["split"] = split
        if not index["items"]:
            raise UserError(f"no val question is in the {split} split of the minival file", where=str(minival_file),
                            field="data.minival_file")
        return index
    return load_index(folder / f"{split}.index.json", kind)


def answer_vocab(source: str, dataset: str, train_indexes: Sequence[dict[str, Any]]) -> dict[str, int]:
    """`auto`: CLIP-ViL's shipped vocabulary for real data (3,129 VQAv2 / 1,842 GQA answers), every
    training answer for shapes; else a vocabulary file (`{answer: label}` or `[answer, ...]`)."""
    if source != "auto":
        return load_answer_vocab(source)
    if dataset in ("vqav2", "gqa"):
        return real_answer_vocab(dataset)
    return build_answer_vocab(list(train_indexes))


def majority_answer(indexes: Sequence[dict[str, Any]]) -> str:
    """The most frequent answer over the training questions (VQA: each question's top soft score)."""
    counts: dict[str, int] = {}
    for index in indexes:
        for it in index["items"]:
            ans = max(it["answers"], key=it["answers"].get) if "answers" in it and it["answers"] else it.get("answer")
            if isinstance(ans, str):
                counts[ans] = counts.get(ans, 0) + 1
    if not counts:
        raise UserError("the training questions have no answers", field="data.train_splits")
    return max(sorted(counts), key=counts.get)


# ----------------------------------------------------------------------------- one split, after the policy
@dataclass
class QuestionSplit:
    """The questions of one split that have a readable image, with what was dropped or is OOV."""

    name: str
    dataset: VQADataset | GQADataset
    unreadable_images: int = 0

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.dataset.items

    @property
    def question_ids(self) -> list[Any]:
        return [it["question_id"] for it in self.items]

    @property
    def questions(self) -> list[str]:
        return [it["question"] for it in self.items]

    @property
    def image_paths(self) -> list[Path]:
        return [self.dataset.media(it["image"]) for it in self.items]

    def counts(self) -> dict[str, int]:
        return {**self.dataset.counts(), "unreadable_images": self.unreadable_images}

    def drop_unreadable(self) -> None:
        """Decode every image once; questions of an image that cannot be read are dropped and counted."""
        bad: dict[str, bool] = {}
        for it in self.items:
            if it["image"] not in bad:
                try:
                    read_image(self.dataset.media(it["image"]))
                    bad[it["image"]] = False
                except UNREADABLE as err:  # read_image's _Unreadable is an OSError
                    bad[it["image"]] = True
                    warnings.warn(f"{self.name}: unreadable image {it['image']} ({err}); its questions are skipped",
                                  stacklevel=2)
        kept = [it for it in self.items if not bad[it["image"]]]
        self.unreadable_images = len(self.items) - len(kept)
        if not kept:
            raise UserError("no question of this split has a readable image", where=self.dataset.index.get("path"))
        self.dataset.items = kept


def load_split(folder: Path, split: str, task: str, vocab: dict[str, int], transform: Callable | None = None,
               minival_file: str | None = None, check_images: bool = True, drop_missing: bool = True) -> QuestionSplit:
    """One split as a VQA / GQA dataset: missing images dropped and counted (unless not
    `drop_missing`), unreadable ones too (`check_images`), OOV answers counted."""
    kind = "vqa" if task == "vqa" else "gqa"
    cls = VQADataset if kind == "vqa" else GQADataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted in results.json
        index = split_index(folder, split, kind, minival_file)
        data = QuestionSplit(split, cls(index, transform, vocab, drop_missing=drop_missing))
    if check_images:
        data.drop_unreadable()
    return data


def annotations(split: QuestionSplit) -> list[dict[str, Any]]:
    """The official VQA annotation records of a split's questions (the ten raw answers)."""
    return [{"question_id": it["question_id"], "question_type": it["question_type"],
             "answer_type": it["answer_type"], "answers": it["raw_answers"]} for it in split.items]


# ----------------------------------------------------------------------------- training inputs
@dataclass
class ImageGrids:
    """The image backbone's grid tokens of each distinct image (`N x T x C`, in memory) + its grid."""

    tokens: Tensor
    grid: tuple[int, int] | None
    row: dict[str, int]

    @classmethod
    @torch.no_grad()
    def compute(cls, backbone: CrossModalBackbone, paths: Sequence[Path], transform: Callable,
                batch_size: int) -> ImageGrids:
        unique = list(dict.fromkeys(str(p) for p in paths))
        chunks, grid = [], None
        was = backbone.image.training
        backbone.image.eval()
        try:
            for i in range(0, len(unique), batch_size):
                pixels = torch.stack([transform(read_image(Path(p))) for p in unique[i:i + batch_size]])
                tokens, grid = backbone.visual_tokens({"images": pixels})
                chunks.append(tokens.float())
        finally:
            backbone.image.train(was)
        return cls(torch.cat(chunks), grid, {p: i for i, p in enumerate(unique)})

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()


def grid_inputs(grids: Tensor, grid: tuple[int, int] | None, tokens: dict[str, Tensor]) -> dict[str, Any]:
    """The cross-modal backbone's input with the image layer's tokens computed earlier."""
    out: dict[str, Any] = {"grid": grids, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    if grid is not None:
        out["grid_hw"] = list(grid)
    return out


class Rows(Dataset):
    """Question positions 0..N-1: the cached collates gather everything else."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


@dataclass
class TrainRows:
    """The training questions in order: image path, question, VQA soft target or GQA label."""

    paths: list[str]
    questions: list[str]
    targets: Tensor  # N x answers (vqa) or N (gqa, -1 outside the vocabulary)
    task: str

    @classmethod
    def of(cls, splits: Sequence[QuestionSplit], vocab: dict[str, int], task: str) -> TrainRows:
        items = [(s, it) for s in splits for it in s.items]
        if task == "vqa":
            targets = torch.stack([soft_target(it["answers"], vocab) for _, it in items])
        else:
            targets = torch.tensor([vocab.get(it["answer"], -1) for _, it in items], dtype=torch.long)
        return cls([str(s.dataset.media(it["image"])) for s, it in items], [it["question"] for _, it in items],
                   targets, task)

    def target_entry(self, rows: Tensor) -> dict[str, Tensor]:
        return {"target": self.targets[rows]} if self.task == "vqa" else {"label": self.targets[rows]}


class GridCollate:
    """Rows -> `{"inputs": grid inputs, "target" | "label"}` (the encoder runs live on cached grids)."""

    def __init__(self, rows: TrainRows, grids: ImageGrids, tokenize: Callable[[list[str]], dict[str, Tensor]]):
        self.rows, self.grids, self.tokenize = rows, grids, tokenize
        self.image_row = torch.tensor([grids.row[p] for p in rows.paths])

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        rows = torch.tensor(idx)
        tokens = self.tokenize([self.rows.questions[i] for i in idx])
        inputs = grid_inputs(self.grids.tokens[self.image_row[rows]], self.grids.grid, tokens)
        return {"inputs": inputs, **self.rows.target_entry(rows)}


class FeatureCollate:
    """Rows -> `{"inputs": Precomputed per-layer encoder features, "target" | "label"}`."""

    def __init__(self, rows: TrainRows, store: Any):
        self.rows, self.store = rows, store

    def __call__(self, idx: list[int]) -> dict[str, Any]:
        rows = torch.tensor(idx)
        return {"inputs": self.store.get(rows), **self.rows.target_entry(rows)}


class LiveCollate:
    """Dataset samples -> `{"inputs": images + question tokens, "target" | "label", "skipped"}`."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, Tensor]], task: str):
        self.inner, self.task = Collator(tokenize, text_key="question"), task

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(samples)
        key = "target" if self.task == "vqa" else "label"
        return {"inputs": CrossModalBackbone.inputs(batch["image"], batch["text"]), key: batch[key],
                "skipped": batch.get("skipped", 0)}


def live_dataset(splits: Sequence[QuestionSplit], transform: Callable) -> Dataset:
    """The training splits as one dataset that decodes each image when asked (no cache)."""
    for s in splits:
        s.dataset.transform = transform
    return splits[0].dataset if len(splits) == 1 else ConcatDataset([s.dataset for s in splits])


def grid_batches(rows: TrainRows, grids: ImageGrids, tokenize: Callable, batch_size: int) -> Iterator[dict[str, Any]]:
    """The training rows in order as grid inputs (what the encoder-feature cache is computed from)."""
    collate = GridCollate(rows, grids, tokenize)
    for i in range(0, len(rows.questions), batch_size):
        yield collate(list(range(i, min(i + batch_size, len(rows.questions)))))["inputs"]


# ----------------------------------------------------------------------------- evaluation inputs
@dataclass
class EvalInputs:
    """The eval split's inputs, in the answerer's batches: grid inputs, and (frozen encoder) features."""

    split: QuestionSplit
    grid_batches: list[dict[str, Any]]
    feature_batches: list[Precomputed] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def build(cls, split: QuestionSplit, answerer: VisualQuestionAnswerer, backbone: CrossModalBackbone) -> EvalInputs:
        was = backbone.image.training
        backbone.image.eval()
        try:
            out = []
            for x in answerer.input_batches(split.image_paths, split.questions):
                tokens, grid = backbone.visual_tokens(x)
                out.append(grid_inputs(tokens, grid, x))
        finally:
            backbone.image.train(was)
        return cls(split, out)

    @torch.no_grad()
    def freeze_features(self, backbone: CrossModalBackbone) -> None:
        """Every encoder layer of every eval batch, computed once (float32, in memory)."""
        was = backbone.training
        backbone.eval()
        try:
            with_input = backbone.input_spec is not None  # side networks may read b_0
            self.feature_batches = [Precomputed(list(backbone.features(x, with_input=with_input)),
                                                backbone.padding_mask(x)) for x in self.grid_batches]
        finally:
            backbone.train(was)

    def batches(self) -> list[Any]:
        """What an evaluation runs: the frozen features when computed, else the grid inputs."""
        return self.feature_batches if self.feature_batches is not None else self.grid_batches
