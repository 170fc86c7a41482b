"""The VQA recipe's setup: which question set and splits, the backbone, the run's data (splits,
vocabulary, caches), the shared connector alignment, and the `--compare` columns.

The connector alignment (`ConnectorAlignment`, see `mdpd_vl/tasks/vqa_model.py` for why it exists)
runs once per (backbone, data, alignment settings, seed): its result, the connector's weights, is
kept in the cache folder under a key of all of these, so every method of a `--compare` (and any
later run with the same settings) starts from the very same connector.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.utils.data import Subset

from mdpd_vl import dist
from mdpd_vl.atomic import write_text, write_with
from mdpd_vl.backbones.cache import cache_key, cached_features
from mdpd_vl.backbones.crossmodal import CrossModalBackbone, build_crossmodal
from mdpd_vl.deploy.retrieval import build_image_transform, image_preprocess
from mdpd_vl.deploy.vqa import VisualQuestionAnswerer, run_batches
from mdpd_vl.engine.config import dump_config
from mdpd_vl.engine.train import train
from mdpd_vl.errors import UserError
from mdpd_vl.tasks import common
from mdpd_vl.tasks import vqa_data as vd
from mdpd_vl.tasks import vqa_eval as ev
from mdpd_vl.tasks.vqa_model import ConnectorAlignment

if TYPE_CHECKING:
    from mdpd_vl.tasks.vqa import VQARunConfig

# methods whose encoder never changes: per-layer features computed once are what live passes give
FROZEN_ENCODER = ("linear", "unipt", "sherl", "lst")
QUESTION_SETS = {"vqav2": "vqa", "gqa": "gqa"}  # the question set (and loss) each real dataset has


def check(cfg: VQARunConfig) -> str:
    """The question set of the run (`vqa` | `gqa`), after checking it fits the dataset."""
    dataset, task = cfg.data.dataset, cfg.vqa.task
    if dataset not in ("shapes", *QUESTION_SETS):
        raise UserError(f"unknown dataset {dataset!r}; valid: shapes, {', '.join(QUESTION_SETS)}", field="data.dataset")
    if dataset in QUESTION_SETS and task != QUESTION_SETS[dataset]:
        raise UserError(f"{dataset} has {QUESTION_SETS[dataset]} questions, not {task}", field="vqa.task")
    if not cfg.data.train_splits:
        raise UserError("name at least one split to train on", field="data.train_splits")
    uses = [s for s in (*cfg.data.train_splits, eval_split(cfg, task)) if s in vd.MINIVAL_SPLITS]
    if uses and task == "vqa" and cfg.data.minival_file is None:
        vd.minival_ids(None, uses[0])  # the one-line error, before any backbone is loaded
    return task


def eval_split(cfg: VQARunConfig, task: str) -> str:
    return cfg.data.eval_split or ("val" if task == "vqa" else "testdev")


def encoder_frozen(cfg: VQARunConfig) -> bool:
    """The method never changes the encoder, whose frozen parts run in eval mode."""
    m = cfg.method
    frozen = m.name in FROZEN_ENCODER or (m.name == "mdpd" and m.distill.backbone_trainable == "head")
    return frozen and m.backbone_mode == "eval"


def index_dir(cfg: VQARunConfig, task: str) -> Path:
    """The folder holding `<split>.index.json`, building the shapes world's questions when absent."""
    root = common.data_root(cfg.data.root)
    if cfg.data.dataset == "shapes":
        from mdpd_vl.data.shapes_world import TASK_DIRS, ensure_shapes

        return ensure_shapes(root / "shapes", cfg.data.shapes_scale, cfg.data.shapes_seed, tasks=[task]) / TASK_DIRS[task]
    folder = root / cfg.data.dataset
    splits = [*cfg.data.train_splits, eval_split(cfg, task), *([cfg.data.predict_split] if cfg.data.predict_split else [])]
    for name in dict.fromkeys("val" if s in vd.MINIVAL_SPLITS else s for s in splits):
        if not (folder / f"{name}.index.json").is_file():
            raise UserError(f"no {name} index: prepare the data first with `python data_prep/{cfg.data.dataset}.py "
                            f"--raw <download folder> --out {folder}`", where=str(folder / f"{name}.index.json"))
    return folder


def build_backbone(cfg: VQARunConfig) -> CrossModalBackbone:
    """Image backbone + connector + BERT-class encoder, from the run's names."""
    if cfg.data.dataset != "shapes":
        index_dir(cfg, cfg.vqa.task)  # a missing real dataset is one line, before any backbone is loaded
    return build_crossmodal(cfg.backbone, cfg.text_backbone, cfg.pretrained, max_grid=cfg.max_grid,
                            max_length=cfg.data.max_question_len)


def eval_split_only(cfg: VQARunConfig, task: str) -> vd.QuestionSplit:
    """The eval split's questions, every one (for `--score`: a results file answers them all)."""
    folder = index_dir(cfg, task)
    return vd.load_split(folder, eval_split(cfg, task), task, {}, minival_file=cfg.data.minival_file,
                         check_images=False, drop_missing=False)


# ----------------------------------------------------------------------------- the run's data
@dataclass
class RunData:
    """Splits, vocabulary and inputs of one run (shared through `memo` by the runs of a --compare)."""

    task: str
    folder: Path
    vocab: dict[str, int]
    answers: list[str]
    train_splits: list[vd.QuestionSplit]
    eval: vd.QuestionSplit
    majority: dict[str, Any]
    cache_dir: Path | None
    memo: dict[str, Any]

    @classmethod
    def load(cls, cfg: VQARunConfig, task: str, backbone: CrossModalBackbone, memo: dict[str, Any]) -> RunData:
        if "data" in memo:
            return memo["data"]
        from mdpd_vl.data.datasets import label_to_answer

        folder, d = index_dir(cfg, task), cfg.data
        indexes = [vd.split_index(folder, s, task, d.minival_file) for s in d.train_splits]
        vocab = vd.answer_vocab(d.vocab, d.dataset, indexes)
        splits = [vd.load_split(folder, s, task, vocab, minival_file=d.minival_file) for s in d.train_splits]
        evalset = vd.load_split(folder, eval_split(cfg, task), task, vocab, minival_file=d.minival_file)
        majority = ev.majority_baseline(task, evalset, vd.majority_answer(indexes))
        cache = common.cache_dir(d.cache_dir, common.data_root(d.root))
        out = cls(task, folder, vocab, label_to_answer(vocab), splits, evalset, majority, cache, memo)
        memo["data"] = out
        dist.show(f"majority-answer baseline on {evalset.name}: {majority['accuracy']} ({majority['answer']!r})")
        return out

    def preprocess(self, cfg: VQARunConfig, backbone: CrossModalBackbone) -> dict[str, Any]:
        """What the deployed answerer (and its export) preprocesses with: the evaluation's settings."""
        return {"image": image_preprocess(cfg.data.image_size, backbone), "text": {"max_length": cfg.data.max_question_len},
                "batch_size": cfg.data.eval_batch_size}

    def _answerer(self, cfg: VQARunConfig, backbone: CrossModalBackbone) -> VisualQuestionAnswerer:
        return VisualQuestionAnswerer(backbone, self.preprocess(cfg, backbone), self.answers, backbone)

    def prepare_grids(self, cfg: VQARunConfig, backbone: CrossModalBackbone, memo: dict[str, Any]) -> None:
        """The training rows, the training images' grids (`cache_grids`) and the eval split's grid
        inputs in the answerer's batches: all frozen image backbone, computed once per --compare."""
        if "rows" in memo:
            return
        memo["rows"] = rows = vd.TrainRows.of(self.train_splits, self.vocab, self.task)
        transform = self.transform(cfg, backbone)
        memo["grids"] = vd.ImageGrids.compute(backbone, rows.paths, transform, cfg.data.eval_batch_size) \
            if cfg.data.cache_grids else None
        memo["eval_grids"] = vd.EvalInputs.build(self.eval, self._answerer(cfg, backbone), backbone).grid_batches

    def transform(self, cfg: VQARunConfig, backbone: CrossModalBackbone) -> Any:
        return build_image_transform(self.preprocess(cfg, backbone)["image"], backbone)

    def live_inputs(self, cfg: VQARunConfig, backbone: CrossModalBackbone) -> tuple[Any, Any]:
        """Training inputs with a live encoder: cached grids, else images decoded on the fly."""
        rows, grids = self.memo["rows"], self.memo["grids"]
        if grids is not None:
            return vd.Rows(len(rows.questions)), vd.GridCollate(rows, grids, backbone.tokenize)
        return vd.live_dataset(self.train_splits, self.transform(cfg, backbone)), vd.LiveCollate(backbone.tokenize,
                                                                                                 self.task)

    def training_inputs(self, cfg: VQARunConfig, backbone: CrossModalBackbone, frozen: bool) -> tuple[Any, Any, bool]:
        """(dataset, collate, cached): cached encoder features where exact, else the live inputs."""
        rows = self.memo["rows"]
        if frozen and cfg.data.cache_features:
            key = {"task": self.task, "folder": str(self.folder.resolve()), "splits": cfg.data.train_splits,
                   "size": cfg.data.image_size, "max_len": cfg.data.max_question_len, "n": len(rows.questions)}
            store, _ = cached_features(backbone, self._row_batches(cfg, backbone), self.cache_dir, key,
                                       desc="caching encoder features")
            dataset, collate, cached = vd.Rows(len(rows.questions)), vd.FeatureCollate(rows, store), True
        else:
            (dataset, collate), cached = self.live_inputs(cfg, backbone), False
        if cfg.data.max_train_questions is not None:
            dataset = Subset(dataset, range(min(cfg.data.max_train_questions, len(dataset))))
        return dataset, collate, cached

    def _row_batches(self, cfg: VQARunConfig, backbone: CrossModalBackbone) -> Any:
        rows, grids, bs = self.memo["rows"], self.memo["grids"], cfg.data.eval_batch_size
        if grids is not None:
            return vd.grid_batches(rows, grids, backbone.tokenize, bs)
        return self._answerer(cfg, backbone).input_batches([Path(p) for p in rows.paths], rows.questions, bs)

    def eval_inputs(self, backbone: CrossModalBackbone, frozen: bool) -> vd.EvalInputs:
        """The eval split's grid inputs (shared), and with a frozen encoder its features too."""
        evals = vd.EvalInputs(self.eval, self.memo["eval_grids"])
        if frozen:
            evals.freeze_features(backbone)
        return evals

    def predict(self, cfg: VQARunConfig, answerer: VisualQuestionAnswerer, task: str, out: Path) -> str | None:
        """`--predict SPLIT`: the results file of SPLIT for the evaluation server."""
        split = cfg.data.predict_split
        if split is None:
            return None
        data = vd.load_split(self.folder, split, task, self.vocab, minival_file=cfg.data.minival_file)
        return str(ev.predict(answerer, data, task, out / f"predictions_{split}.json"))

    def counts(self) -> dict[str, Any]:
        """What was skipped or fell outside the vocabulary, per training split and for the eval split."""
        return {"train": {s.name: s.counts() for s in self.train_splits}, "eval": self.eval.counts()}


# ----------------------------------------------------------------------------- the shared alignment
def align(cfg: VQARunConfig, backbone: CrossModalBackbone, data: RunData) -> dict[str, Any]:
    """Train the connector through the frozen encoder (or load the connector this stage gave before
    for the same backbone, data, settings and seed); returns its record (accuracy on the eval split)."""
    from safetensors.torch import load_model, save_model

    key = cache_key(backbone, {"stage": "vqa connector alignment", "task": data.task, "folder": str(data.folder.resolve()),
                               "splits": cfg.data.train_splits, "size": cfg.data.image_size,
                               "max_len": cfg.data.max_question_len, "align": dump_config(cfg.align),
                               "loss": [cfg.vqa.gqa_loss, cfg.vqa.pooling], "seed": cfg.train.seed,
                               "max_questions": cfg.data.max_train_questions})
    folder = Path(data.cache_dir) / f"vqa-align-{key}"
    weights, record = folder / "connector.safetensors", folder / "alignment.json"
    if weights.is_file() and record.is_file():
        load_model(backbone.connector, str(weights), strict=True)
        return {**json.loads(record.read_text()), "reused": True}
    stage = ConnectorAlignment(backbone, len(data.answers), cfg.vqa)
    dataset, collate = data.live_inputs(cfg, backbone)
    if cfg.data.max_train_questions is not None:
        dataset = Subset(dataset, range(min(cfg.data.max_train_questions, len(dataset))))
    tcfg = replace(cfg.train, epochs=cfg.align.epochs, batch_size=cfg.align.batch_size, lr=cfg.align.lr,
                   max_steps=None, warmup_steps=0, warmup_ratio=0.05, schedule="cosine", ckpt_every=0)
    groups = [{"name": k, "params": v} for k, v in stage.param_groups().items()]
    result = train(stage, lambda m, b, s: {"loss": m.losses(b)["task"]}, dataset, collate, groups, tcfg,
                   folder / "train", resume="auto", config={"align": dump_config(cfg.align), "key": key})
    answers = [data.answers[i] for i in run_batches(stage, data.memo["eval_grids"]).argmax(-1).tolist()]
    metrics = ev.score(data.task, data.eval, {str(q): a for q, a in zip(data.eval.question_ids, answers)})
    write_with(weights, lambda tmp: save_model(backbone.connector, tmp))
    info = {"epochs": cfg.align.epochs, "steps": result.step, "seconds": round(result.wall_seconds, 1),
            "accuracy": metrics["accuracy"], "split": data.eval.name, "folder": str(folder)}
    write_text(record, json.dumps(info, indent=2) + "\n")
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)  # the connector file is what is kept
    backbone.requires_grad_(False)
    backbone.eval()
    return {**info, "reused": False}


# ----------------------------------------------------------------------------- --compare
def compare_columns(r: dict[str, Any]) -> dict[str, Any]:
    """VQA's extra columns of a --compare row: per-type accuracy and latency against the bare model."""
    m, eff = r["metrics"], r["efficiency"]
    parts = ("binary", "open") if r["question_set"] == "gqa" else ev.ANSWER_TYPES
    out = {p: m.get(p) if m.get(p) is not None else "-" for p in parts}
    out["ms / batch"] = eff["latency_ms"]
    out["x bare"] = round(eff["latency_ms"] / eff["latency_ms_bare"], 3) if eff.get("latency_ms_bare") else "-"
    return out


def gains_table(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """MDPD's faded model against each side-kept method of the comparison: accuracy and speed.

    Latencies come from different runs, so each is taken relative to the bare model timed
    interleaved with it in its own run (`x bare`), which cancels the load of the machine at the time."""
    from mdpd_vl.cards import markdown_table

    side = [(lab, r) for lab, r in zip(labels, runs) if r["method"] in ("unipt", "sherl", "lst")]
    ours = [(lab, r) for lab, r in zip(labels, runs) if r["method"] == "mdpd"]
    rows = []
    for lab, r in ours:
        mine = r["efficiency"]["latency_ms"] / r["efficiency"]["latency_ms_bare"]
        for slab, s in side:
            theirs = s["efficiency"]["latency_ms"] / s["efficiency"]["latency_ms_bare"]
            rows.append({"MDPD run": lab, "vs side kept": slab, "accuracy (MDPD faded)": r["metrics"]["accuracy"],
                         "accuracy (side kept)": s["metrics"]["accuracy"],
                         "accuracy gain": round(r["metrics"]["accuracy"] - s["metrics"]["accuracy"], 2),
                         "latency x bare (MDPD)": round(mine, 3), "latency x bare (side kept)": round(theirs, 3),
                         "QPS gain": f"{100 * (theirs / mine - 1):+.1f}%"})
    if not rows:
        return ""
    return "MDPD (faded) against each side-kept method:\n\n" + markdown_table(rows)


__all__ = ["RunData", "align", "build_backbone", "check", "compare_columns", "encoder_frozen", "eval_split",
           "eval_split_only", "gains_table", "index_dir"]
