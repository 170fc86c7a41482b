"""What only ITR needs around its recipe: retrieval data (live or from the frozen-feature cache), the
deployed retriever, Recall@K evaluation, the efficiency batch, and ITR's tables and card words.

Everything task-independent (results schema, efficiency block, export, card, `--compare`, the
end-of-run summary) is in `mdpd_vl.tasks.kit`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Subset

from mdpd_vl.backbones.base import Precomputed
from mdpd_vl.cards import markdown_table
from mdpd_vl.data import retrieval_inputs as ri
from mdpd_vl.data.datasets import ImageTextEval
from mdpd_vl.data.transforms import clip_transform, transform_stats
from mdpd_vl.deploy.retrieval import ImageTextRetriever, encode_batches, image_preprocess
from mdpd_vl.eval.retrieval import evaluate_itr
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks.retrieval import DualTowerRetrieval

if TYPE_CHECKING:
    from mdpd_vl.tasks.itr import ITRConfig

# Methods whose backbone never changes and whose backbone inputs are deterministic, so that
# per-layer features computed once are what a live pass gives (stored as float16, tasks/itr.md).
CACHE_EXACT = ("linear", "unipt", "sherl", "lst")


def cache_is_exact(cfg: ITRConfig) -> bool:
    """Frozen-feature caching gives the numbers of live passes (up to float16 storage) for this method:
    its backbone never changes, and runs in eval mode (`bn_eval` keeps dropout on in training, so a
    live pass differs from step to step and one cached pass is not what it computes)."""
    m = cfg.method
    frozen = m.name in CACHE_EXACT or (m.name == "mdpd" and m.distill.backbone_trainable == "head")
    return frozen and m.backbone_mode == "eval"


@dataclass
class RetrievalData:
    """The training set + collate (live, or cached frozen features) and the eval split.

    The eval split is read from its files through the deployed retriever's own batching; with a
    frozen backbone its per-layer features are computed once (`freeze_eval_inputs`, float32, in
    memory) and every evaluation (before training, deployed, side kept) reads them: the same
    numbers as live passes, bit for bit, since the same backbone runs on the same batches."""

    train_set: Any
    collate: Any
    evalset: ImageTextEval
    image_paths: list[Path]
    tokenize: Any
    cached: bool
    cache_dir: Path | None
    eval_inputs: tuple[list[Precomputed], list[Precomputed]] | None = None

    def freeze_eval_inputs(self, retr: ImageTextRetriever) -> None:
        """Compute the eval split's frozen per-layer features once, batched as `retr` batches it."""
        self.eval_inputs = (_frozen(retr.image_backbone, retr.image_inputs(self.image_paths)),
                            _frozen(retr.text_backbone, retr.text_inputs(self.evalset.captions)))

    @classmethod
    def build(cls, cfg: ITRConfig, model: DualTowerRetrieval, folder: Path) -> RetrievalData:
        img_bb, txt_bb = model.image.backbone, model.text.backbone
        transform = eval_transform(img_bb, cfg.data.image_size)

        def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
            return txt_bb.tokenize(texts, max_length=cfg.data.max_text_len)

        evalset = ImageTextEval(folder / f"{cfg.data.eval_split}.index.json", transform)
        paths = [evalset.pairs.media(item["image"]) for item in evalset.pairs.items]
        cached = cfg.data.cache_features and cache_is_exact(cfg)
        cache = None
        if cached:
            cache = common.cache_dir(cfg.data.cache_dir, common.data_root(cfg.data.root))
            key = {"dataset": cfg.data.dataset, "folder": str(folder.resolve()), "size": cfg.data.image_size,
                   "max_text_len": cfg.data.max_text_len, "split": cfg.data.train_split}
            train_split = ImageTextEval(folder / f"{cfg.data.train_split}.index.json", transform)
            t_img, t_txt, _ = ri.cache_split(img_bb, txt_bb, train_split, tokenize, cache, key,
                                             cfg.data.eval_batch_size)
            train_set: Any = ri.PairIndices(train_split.caption_to_image)
            collate: Any = ri.CachedPairCollate(t_img, t_txt)
        else:
            train_set = ri.train_pairs(folder / f"{cfg.data.train_split}.index.json", transform)
            collate = ri.LivePairCollate(tokenize)
        if cfg.data.max_train_pairs is not None:
            train_set = Subset(train_set, range(min(cfg.data.max_train_pairs, len(train_set))))
        return cls(train_set, collate, evalset, paths, tokenize, cached, cache)


@torch.no_grad()
def _frozen(backbone: Any, batches: Any) -> list[Precomputed]:
    was = backbone.training
    backbone.eval()
    try:
        with_input = getattr(backbone, "input_spec", None) is not None  # side networks may read b_0
        return [Precomputed(list(backbone.features(x, with_input=with_input)), backbone.padding_mask(x))
                for x in batches]
    finally:
        backbone.train(was)


def eval_transform(backbone: Any, size: int | None) -> Any:
    """The backbone's own preprocessing, at `size` pixels when given (same mean/std)."""
    own = backbone.transform(False)
    if size is None:
        return own
    stats = transform_stats(own) or {}
    kw = {k: stats[k] for k in ("mean", "std") if k in stats}
    return clip_transform(size, **kw)


def retriever(model: DualTowerRetrieval, cfg: ITRConfig, side_kept: bool = False) -> ImageTextRetriever:
    """The deployed (or side-kept) towers with the evaluation's preprocessing: what the export holds."""
    img_bb, txt_bb = model.image.backbone, model.text.backbone
    preprocess = {"image": image_preprocess(cfg.data.image_size, img_bb),
                  "text": {"max_length": cfg.data.max_text_len}, "batch_size": cfg.data.eval_batch_size}
    image, text = model.deployed(side_kept=side_kept)
    return ImageTextRetriever(image, text, preprocess, img_bb, txt_bb)


def evaluate(retr: ImageTextRetriever, data: RetrievalData, folds: int = 1) -> dict[str, float]:
    """Recall@K / Rsum of `retr` on the eval split, its images read from their files.

    With `folds > 1` (COCO), the whole split is scored (5K) and the `<key>_<folds>fold` entries
    hold the average over contiguous folds (the 1K protocol)."""
    if data.eval_inputs is not None:  # frozen backbone: its features of the eval split, computed once
        img, txt = encode_batches(retr.image, data.eval_inputs[0]), encode_batches(retr.text, data.eval_inputs[1])
    else:
        img, txt = retr.encode_images(data.image_paths), retr.encode_texts(data.evalset.captions)
    sims = (img @ txt.t()).numpy()
    c2i = data.evalset.caption_to_image
    out = {k: round(float(v), 2) for k, v in evaluate_itr(sims, c2i).items()}
    if folds > 1:
        out.update({f"{k}_{folds}fold": round(float(v), 2) for k, v in evaluate_itr(sims, c2i, folds=folds).items()})
    return out


def efficiency(model: DualTowerRetrieval, data: RetrievalData, cfg: ITRConfig, deployed: ImageTextRetriever,
               rounds: int = 3) -> dict[str, Any]:
    """The kit's efficiency block on one live batch of test images and captions (<= 32 pairs)."""
    batch = _live_batch(data, min(cfg.train.batch_size, 32))
    n = len(batch["image_index"])
    params = [p for group in model.param_groups().values() for p in group]

    def closure() -> torch.Tensor:
        return sum(model.losses(batch["image"], batch["text"], batch["image_index"]).values())

    def pair(img: torch.nn.Module, txt: torch.nn.Module) -> Any:
        img.eval(), txt.eval()
        return lambda: (img(batch["image"]), txt(batch["text"]))

    side = model.deployed(side_kept=True) if model.is_mdpd else None
    timed = {"deployed": pair(deployed.image, deployed.text),
             # a Backbone's forward is its per-layer features: what the bare backbone costs
             "bare": pair(_bare(model.image.backbone, deployed.image), _bare(model.text.backbone, deployed.text)),
             "side_kept": pair(*side) if side is not None else None}
    step = kit.TrainStep(model, closure, params, (batch["image"], batch["text"]), n)
    return kit.efficiency(
        step, timed, n, rounds=rounds,
        trainable_params=sum(t.trainable_params for t in (model.image, model.text)),
        inference_params=sum(t.inference_params for t in (model.image, model.text)),
        inference_params_side_kept=_count(side) if side is not None else None)


def _bare(live: torch.nn.Module, deployed: torch.nn.Module) -> torch.nn.Module:
    """The backbone whose features are "bare": a deployed plain backbone + head (merged LoRA, faded MDPD)
    has the bare architecture; otherwise the live one (side-kept networks leave it unmodified). The live
    backbone of a LoRA run still holds its unmerged tuner layers, slower than the bare architecture."""
    from mdpd_vl.export import is_plain

    return deployed.backbone if is_plain(deployed) else live


def _count(modules: tuple[torch.nn.Module, ...]) -> int:
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def _live_batch(data: RetrievalData, n: int) -> dict[str, Any]:
    images = next(iter(ri.image_batches(data.evalset, n)))
    caps = [data.evalset.captions[data.evalset.image_to_captions[i][0]] for i in range(len(images))]
    return {"image": images, "text": data.tokenize(caps), "image_index": torch.arange(len(images))}


# ----------------------------------------------------------------------------- ITR's tables and card
def metrics_table(results: dict[str, Any]) -> str:
    """Recall@K, Rsum, inference parameters and QPS per deployment, and the bare backbones' QPS."""
    eff = results["efficiency"]
    deployments = [("deployed" if results["method"] != "mdpd" else "faded (deployed)", results["metrics"],
                    eff["inference_params"], eff["infer_qps"])]
    if results.get("metrics_side_kept"):
        deployments.append(("side kept", results["metrics_side_kept"], eff["inference_params_side_kept"],
                            eff["infer_qps_side_kept"]))
    rows = [{"model": name, "i2t R@1": m["i2t_r1"], "R@5": m["i2t_r5"], "R@10": m["i2t_r10"], "t2i R@1": m["t2i_r1"],
             "R@5 ": m["t2i_r5"], "R@10 ": m["t2i_r10"], "Rsum": m["rsum"],
             "infer params (M)": round(params / 1e6, 2), "QPS": qps} for name, m, params, qps in deployments]
    rows.append({"model": "bare backbones (reference)", "infer params (M)": "-", "QPS": eff.get("infer_qps_bare") or "-"})
    before = (results.get("metrics_before_training") or {}).get("rsum")
    note = f"Rsum before training {before}" + ("; trained on cached frozen features" if results["cached_features"]
                                               else "")
    return markdown_table(rows) + "\n\n" + note


def use_snippet(export_dir: Path | None, data: RetrievalData) -> str:
    """The card's "Use" code: reload the export, embed a test image and two captions, compare."""
    if export_dir is None:
        return ("# not exported: this method's deployed towers are not a plain backbone + head\n"
                "# (side-kept networks and unmergeable adapters change the backbone)")
    image = _shown(data.image_paths[0])
    caption = data.evalset.captions[data.evalset.image_to_captions[0][0]]
    other = data.evalset.captions[data.evalset.image_to_captions[-1][0]]
    return (f"from mdpd_vl.export import load_exported\n\n"
            f"model = load_exported({_shown(export_dir)!r})  # both towers + the preprocessing they were "
            f"evaluated with\n"
            f"images = model.encode_images([{image!r}])  # PIL images or files -> L2-normalised embeddings\n"
            f"texts = model.encode_texts([{caption!r}, {other!r}])\n"
            f"print(images @ texts.T)  # cosine similarities; the first caption describes the image")


def _shown(path: Path) -> str:
    """`path` relative to the working folder when it lies inside it (cards read better), else absolute."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd())
    return rel if not rel.startswith("..") else str(Path(path).resolve())


def write_card(out: Path, results: dict[str, Any], data: RetrievalData) -> Path:
    """MODEL_CARD.md of an ITR run (its objective in words: `results["objective"]`)."""
    export_dir = Path(results["export_dir"]) if results["export_dir"] else None
    return kit.write_card(
        out, results, title=f"ITR {results['method']} on {results['dataset']}", task_words="image-text retrieval",
        deployed_summary="an image tower and a text tower (backbone + VSE head each) with the preprocessing "
                         "they were evaluated with; no side network.",
        metrics_table=metrics_table(results), use_snippet=use_snippet(export_dir, data),
        objective=results["objective"], data=f"{results['dataset']}, trained on `{results['config']['data']['train_split']}`.")
