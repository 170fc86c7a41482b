"""What only grounding needs around its recipe: the referring expressions (live, or the frozen backbones'
features cached), the deployed grounder, precision@0.5 per split, the best constant box, the PNG of
examples, the efficiency batch, and grounding's tables and card words.

Everything task-independent (results schema, efficiency block, export, card, `--compare`, the end-of-run
summary) is in `mdpd_vl.tasks.kit`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mdpd_vl.backbones.base import Precomputed
from mdpd_vl.backbones.cache import FeatureStore, cached_features
from mdpd_vl.cards import markdown_table
from mdpd_vl.data.datasets import GroundingDataset, read_image
from mdpd_vl.data.transforms import GroundingTransform, grounding_transform
from mdpd_vl.deploy.grounding import ReferringGrounder
from mdpd_vl.eval.grounding import draw_examples, grounding_report, precision_at_k
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks.vg_model import GroundingCollator, GroundingModel, special_token_ids

if TYPE_CHECKING:
    from mdpd_vl.tasks.vg import VGRunConfig


def cache_is_exact(cfg: VGRunConfig) -> bool:
    """Cached per-layer features are what live passes give: placement A (the backbones are the layers), a
    method that never changes them, run in eval mode, and no random crop."""
    return cfg.vg.placement == "backbones" and kit.frozen_features_exact(cfg.method) and cfg.data.crop_prob == 0


# ----------------------------------------------------------------------------- the data
@dataclass
class EvalSplit:
    """One evaluation split: per expression its image file, sentence, ground truth (pixels) and image size."""

    name: str
    index: Path
    dataset: GroundingDataset
    paths: list[Path]
    sentences: list[str]
    gt_xyxy: Tensor
    frozen: list[tuple[Precomputed, Precomputed, Tensor]] | None = None  # frozen backbones' batches

    @classmethod
    def load(cls, folder: Path, name: str) -> EvalSplit:
        ds = GroundingDataset(folder / f"{name}.index.json")
        return cls(name, folder / f"{name}.index.json", ds, [ds.media(it["image"]) for it in ds.items], [it["sentence"] for it in ds.items],
                   torch.tensor([it["bbox_xyxy"] for it in ds.items], dtype=torch.float64))

    @property
    def sizes(self) -> Tensor:
        """`N x 2` (height, width) of each expression's image."""
        return torch.tensor([[float(it["height"]), float(it["width"])] for it in self.dataset.items])


class Rows(Dataset):
    """Training rows of the cached inputs: the expression index and its image's."""

    def __init__(self, image_of: list[int]):
        self.image_of = image_of

    def __len__(self) -> int:
        return len(self.image_of)

    def __getitem__(self, j: int) -> dict[str, int]:
        return {"row": j, "image": self.image_of[j]}


class CachedCollate:
    """`Rows` items -> `Precomputed` image and text batches + target boxes and expression masks."""

    def __init__(self, images: FeatureStore, texts: FeatureStore, boxes: Tensor, expression: Tensor):
        self.images, self.texts, self.boxes, self.expression = images, texts, boxes, expression

    def __call__(self, items: list[dict[str, int]]) -> dict[str, Any]:
        rows, imgs = torch.tensor([it["row"] for it in items]), torch.tensor([it["image"] for it in items])
        return {"image": self.images.get(imgs), "text": self.texts.get(rows), "box": self.boxes[rows],
                "expression_mask": self.expression[rows]}


@dataclass
class GroundingData:
    """The training set + collate (live, or cached frozen features), the eval splits, the preprocessing."""

    train: GroundingDataset
    train_set: Any
    collate: Any
    evals: list[EvalSplit]
    preprocess: dict[str, Any]
    backbones: tuple[Any, Any]
    cached: bool
    cache_dir: Path | None
    baseline: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: VGRunConfig, model: GroundingModel, folder: Path, cached: bool) -> GroundingData:
        image_bb, text_bb = backbones_of(model)
        d = cfg.data
        stats = grounding_transform(image_bb, d.image_size)
        preprocess = {"image": {"size": stats.size, "mean": list(stats.mean), "std": list(stats.std)},
                      "text": {"max_length": d.max_text_len, "special_ids": special_token_ids(text_bb)},
                      "batch_size": d.eval_batch_size}
        train = GroundingDataset(folder / f"{d.train_split}.index.json",
                                 GroundingTransform(stats.size, stats.mean, stats.std, train=True, crop_prob=d.crop_prob))
        evals = [EvalSplit.load(folder, s) for s in d.splits]
        data = cls(train, None, None, evals, preprocess, (image_bb, text_bb), cached, None)
        data.baseline = constant_box_baseline(train, evals)
        if cached:
            data.cache_dir = common.cache_dir(d.cache_dir, common.data_root(d.root))
            data.train_set, data.collate = data._cached_train(cfg, folder)
            for split in evals:
                split.frozen = data._frozen_eval(split)
        else:
            data.train_set, data.collate = train, GroundingCollator(data.tokenize, preprocess["text"]["special_ids"])
        if d.max_train_expressions is not None:
            data.train_set = Subset(data.train_set, range(min(d.max_train_expressions, len(data.train_set))))
        return data

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        return self.backbones[1].tokenize(list(texts), max_length=self.preprocess["text"]["max_length"])

    @property
    def image_transform(self) -> Any:
        p = self.preprocess["image"]
        return GroundingTransform(p["size"], p["mean"], p["std"]).image

    def _unique_images(self, paths: list[Path]) -> tuple[list[Path], list[int]]:
        order: dict[Path, int] = {}
        index = [order.setdefault(p, len(order)) for p in paths]
        return list(order), index

    def _image_batches(self, paths: list[Path]) -> Iterator[Tensor]:
        bs = self.preprocess["batch_size"]
        for i in range(0, len(paths), bs):
            yield torch.stack([self.image_transform(read_image(p)) for p in paths[i:i + bs]])

    def _text_batches(self, sentences: list[str]) -> Iterator[dict[str, Tensor]]:
        bs = self.preprocess["batch_size"]
        for i in range(0, len(sentences), bs):
            yield self.tokenize(sentences[i:i + bs])

    def _expression_masks(self, sentences: list[str], width: int) -> Tensor:
        special = torch.tensor(self.preprocess["text"]["special_ids"], dtype=torch.long)
        out = torch.zeros(len(sentences), width, dtype=torch.bool)
        i = 0
        for tok in self._text_batches(sentences):
            ids, mask = tok["input_ids"], tok["attention_mask"].bool()
            out[i:i + len(ids), :ids.shape[1]] = mask & ~torch.isin(ids, special)
            i += len(ids)
        return out

    def _cached_train(self, cfg: VGRunConfig, folder: Path) -> tuple[Rows, CachedCollate]:
        """Per-layer features of every training image (once per image) and expression, cached on disk."""
        items = self.train.items
        paths, image_of = self._unique_images([self.train.media(it["image"]) for it in items])
        sentences = [it["sentence"] for it in items]
        key = {"task": "vg", "folder": str(folder.resolve()), "split": cfg.data.train_split, "n": len(items),
               "size": self.preprocess["image"]["size"], "max_len": self.preprocess["text"]["max_length"]}
        bs = self.preprocess["batch_size"]
        images, _ = cached_features(self.backbones[0], self._image_batches(paths), self.cache_dir,
                                    {**key, "part": "images"}, total=-(-len(paths) // bs), desc="caching image features")
        texts, _ = cached_features(self.backbones[1], self._text_batches(sentences), self.cache_dir,
                                   {**key, "part": "expressions"}, total=-(-len(items) // bs),
                                   desc="caching expression features")
        boxes = target_boxes(items)
        return Rows(image_of), CachedCollate(images, texts, boxes, self._expression_masks(sentences,
                                                                                           texts.layers[0].shape[1]))

    @torch.no_grad()
    def _frozen_eval(self, split: EvalSplit) -> list[tuple[Precomputed, Precomputed, Tensor]]:
        """The split's frozen per-layer features (float32, in memory; images once each), in the grounder's
        batches: every evaluation of the run reads them, the same numbers as live passes."""
        image_bb, text_bb = self.backbones
        paths, image_of = self._unique_images(split.paths)
        with_input = getattr(image_bb, "input_spec", None) is not None
        image_bb.eval(), text_bb.eval()  # frozen: the training model's train() keeps them so
        chunks = [image_bb.features(x, with_input=with_input) for x in self._image_batches(paths)]
        layers = [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]
        index, sizes, bs = torch.tensor(image_of), split.sizes, self.preprocess["batch_size"]
        out = []
        text_input = getattr(text_bb, "input_spec", None) is not None
        for k, tok in enumerate(self._text_batches(split.sentences)):
            rows = index[k * bs:(k + 1) * bs]
            img = Precomputed([t[rows] for t in layers], None)
            txt = Precomputed(list(text_bb.features(tok, with_input=text_input)), text_bb.padding_mask(tok))
            out.append((img, txt, sizes[k * bs:(k + 1) * bs]))
        return out

    def split_sizes(self) -> str:
        return ", ".join(f"{s.name} {len(s.sentences)}" for s in self.evals)

    def baseline_line(self) -> str:
        b = self.baseline
        return "; ".join(f"{k} P@0.5 {v}" for k, v in b["precision"].items()) + \
            f" (box cx, cy, w, h = {b['box']} of the image)"

    def problems(self) -> dict[str, dict[str, int]]:
        """What each split's annotations had (clipped boxes kept; degenerate, unannotated, blank, missing skipped)."""
        return {"train": dict(self.train.problems), **{s.name: dict(s.dataset.problems) for s in self.evals}}


def backbones_of(model: GroundingModel) -> tuple[Any, Any]:
    """(image backbone, text backbone) whose preprocessing the run uses (placement B: the MDETR's own)."""
    if model.vg.placement == "transformer":
        mdetr = model.tuned_models[0].backbone
        return mdetr.image, mdetr.text  # type: ignore[union-attr]
    return model.tuned_models[0].backbone, model.tuned_models[1].backbone


def target_boxes(items: list[dict[str, Any]]) -> Tensor:
    """`N x 4` normalised (cx, cy, w, h) training targets of grounding items (as `GroundingDataset.load`)."""
    from torchvision.ops import box_convert

    xyxy = torch.tensor([it["bbox_xyxy"] for it in items], dtype=torch.float32)
    wh = torch.tensor([[it["width"], it["height"]] * 2 for it in items], dtype=torch.float32)
    return box_convert(xyxy, "xyxy", "cxcywh") / wh


def constant_box_baseline(train: GroundingDataset, evals: list[EvalSplit], candidates: int = 400) -> dict[str, Any]:
    """The best constant box: of (up to `candidates`) training boxes, normalised by their images, the one
    with the highest precision@0.5 on the training expressions, scored on each eval split."""
    from torchvision.ops import box_convert, box_iou

    def normalised(items: list[dict[str, Any]]) -> Tensor:
        xyxy = torch.tensor([it["bbox_xyxy"] for it in items], dtype=torch.float64)
        wh = torch.tensor([[it["width"], it["height"]] * 2 for it in items], dtype=torch.float64)
        return xyxy / wh

    gt = normalised(train.items)
    step = max(1, len(gt) // candidates)
    cands = gt[::step]
    hits = (box_iou(cands, gt) >= 0.5).double().mean(dim=1)  # boxes in image fractions: one frame for all
    best = cands[int(hits.argmax())]
    out = {"box": [round(v, 3) for v in box_convert(best[None], "xyxy", "cxcywh")[0].tolist()],
           "precision": {"train": round(100 * float(hits.max()), 2)}}
    for split in evals:
        iou = box_iou(best[None], normalised(split.dataset.items))[0]
        out["precision"][split.name] = round(100 * float((iou >= 0.5).double().mean()), 2)
    return out


# ----------------------------------------------------------------------------- the deployed model, evaluation
def grounder(model: GroundingModel, data: GroundingData, side_kept: bool = False) -> ReferringGrounder:
    """The deployed (or side-kept) grounding model with the evaluation's preprocessing: what the export holds."""
    return ReferringGrounder(model.deployed(side_kept=side_kept), data.preprocess, *data.backbones)


@torch.no_grad()
def predict(g: ReferringGrounder, split: EvalSplit) -> tuple[Tensor, Tensor, Tensor]:
    """The split's expressions from its frozen features (else from its files): the answer (`N x 4` pixel boxes,
    the top-scoring query's) and every query's pixel boxes (`N x Q x 4`) and scores (`N x Q`)."""
    if split.frozen is None:
        batches = ((pixels, text, sizes) for pixels, text, sizes in g.batches(split.paths, split.sentences))
    else:
        batches = iter(split.frozen)
    device = next(g.model.parameters()).device
    boxes, scores = [], []
    for img, txt, sizes in batches:
        if split.frozen is None:
            img, txt = img.to(device), {k: v.to(device) for k, v in txt.items()}
        b, sc = g.model.ground_all(img, txt, sizes)
        boxes.append(b.double().cpu()), scores.append(sc.double().cpu())
    every, score = torch.cat(boxes), torch.cat(scores)
    top = every[torch.arange(len(every)), score.argmax(dim=1)]
    return top, every, score


def evaluate(g: ReferringGrounder, data: GroundingData) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """precision@0.5 with IoU and with MDETR's GIoU, and mean IoU, per split (`<split>_iou`, `<split>_giou`,
    `<split>_miou`), MDETR's P@5 / P@10 over the top-scored queries (`<split>_p_at_<k>`, k <= the queries);
    `precision` / `precision_giou` are the first split's (the headline). Also the answer boxes."""
    metrics: dict[str, Any] = {}
    preds = {}
    for split in data.evals:
        pred, every, score = predict(g, split)
        preds[split.name] = pred
        r = grounding_report(pred, split.gt_xyxy, [split.name] * len(pred))[split.name]
        metrics.update({f"{split.name}_iou": round(r["precision_iou"], 2), f"{split.name}_giou":
                        round(r["precision_giou"], 2), f"{split.name}_miou": round(r["miou"], 2)})
        # MDETR's RefExpEvaluator P@k (GIoU >= 0.5 among the k top-scored queries): P@k far above P@1 says
        # the queries find the object and the scores fail to pick it
        ks = [k for k in (5, 10) if k <= every.shape[1]]
        at_k = precision_at_k(list(every), list(score), split.gt_xyxy, ks=ks) if ks else {}
        metrics.update({f"{split.name}_p_at_{k}": round(v, 2) for k, v in at_k.items()})
    first = data.evals[0].name
    return {"precision": metrics[f"{first}_iou"], "precision_giou": metrics[f"{first}_giou"], **metrics}, preds


def write_predictions(out: Path, data: GroundingData, preds: dict[str, Tensor]) -> dict[str, str]:
    """`predictions_<split>.json` per split: each expression's sentence, predicted and ground-truth pixel boxes."""
    paths = {}
    for split in data.evals:
        path = out / f"predictions_{split.name}.json"
        common.write_json(path, {"split": split.name, "sentences": split.sentences,
                                 "images": [str(p) for p in split.paths], "boxes": preds[split.name].tolist(),
                                 "gt_boxes": split.gt_xyxy.tolist()})
        paths[split.name] = str(path)
    return paths


def draw(data: GroundingData, preds: dict[str, Tensor], path: Path, n: int | None = None) -> Path:
    """`examples.png`: up to a dozen expressions of the first test split, spread over distinct images."""
    split = next((s for s in data.evals if s.name.startswith("test")), data.evals[0])
    n = n or 12
    seen: dict[Path, int] = {}
    for j, p in enumerate(split.paths):
        seen.setdefault(p, j)
    picks = list(seen.values())
    picks = picks[::max(1, len(picks) // n)][:n] if len(picks) >= n else \
        (picks + [j for j in range(len(split.paths)) if j not in picks])[:n]
    return draw_examples([split.paths[j] for j in picks], [split.sentences[j] for j in picks],
                         preds[split.name][picks], split.gt_xyxy[picks], path)


def save_checkpoint(model: GroundingModel, folder: Path) -> Path | None:
    """The deployed model as an MDETR checkpoint (placement B's `--pretrained`) when it is a plain MDETR."""
    return model.save_pretrained(folder) if model.savable else None


def live_batch(data: GroundingData, n: int) -> dict[str, Any]:
    """`n` expressions of the first eval split, read and collated as training reads them (no crop)."""
    split = data.evals[0]
    p = data.preprocess["image"]
    ds = GroundingDataset(split.index, GroundingTransform(p["size"], p["mean"], p["std"]))
    samples = [ds[i] for i in range(min(n, len(ds)))]
    return GroundingCollator(data.tokenize, data.preprocess["text"]["special_ids"])(samples)


def efficiency(model: GroundingModel, deployed: ReferringGrounder, data: GroundingData, cfg: VGRunConfig,
               rounds: int = 3) -> dict[str, Any]:
    """The kit's efficiency block on one live batch of eval expressions, plus latency per batch in ms."""
    batch = live_batch(data, cfg.data.timed_batch)
    n = len(batch["sentence"])
    params = [p for group in model.param_groups().values() for p in group]

    def closure() -> Tensor:
        return sum(model.losses(batch).values())  # type: ignore[return-value]

    def call(g: Any) -> Any:
        g.eval()
        return lambda: g(batch["image"], batch["text"])

    side = model.deployed(side_kept=True) if model.is_mdpd else None
    timed = {"deployed": call(deployed.model), "bare": call(model.bare()), "side_kept": call(side) if side else None}
    out = kit.efficiency(kit.TrainStep(model, closure, params, batch, n), timed, n, rounds=rounds,
                         trainable_params=model.trainable_params, inference_params=model.inference_params,
                         inference_params_side_kept=sum(p.numel() for p in side.parameters()) if side else None)
    for name, key in (("latency_ms", "infer_qps"), ("latency_ms_bare", "infer_qps_bare"),
                      ("latency_ms_side_kept", "infer_qps_side_kept")):
        out[name] = round(1000 * n / out[key], 2) if out.get(key) else None
    return out


# ----------------------------------------------------------------------------- grounding's tables and card
def objective(cfg: VGRunConfig) -> str:
    """What the run optimises, in words (`tuning.describe_objective` with MDETR's set loss; for MDPD the
    grounding terms of `vg_model`: the task loss on both paths as `vg.task_on_backbone` says, the matched-query
    distillation instead of the dual path's own logits term, which grounding switches off)."""
    from dataclasses import replace

    from mdpd_vl.tuning.objective import describe_objective

    g, m = cfg.grounding, cfg.method
    loss = (f"MDETR's set loss (Hungarian matching; soft token cross-entropy x{g.ce_coef:g} with no-object weight "
            f"{g.eos_coef:g}, L1 x{g.bbox_coef:g}, GIoU x{g.giou_coef:g}{', on every decoder layer' if g.aux_loss else ''})")
    if m.name != "mdpd":
        return describe_objective(m, {"task_loss": loss})
    text = describe_objective(replace(m, distill=replace(m.distill, logits="none", task_on_backbone=cfg.vg.task_on_backbone)),
                              {"task_loss": loss})
    if cfg.vg.logits == "none":
        return text
    how = "L1 + GIoU + soft cross-entropy" if cfg.vg.logits == "match" else "MSE (the paper's eq. 3)"
    teacher = "an EMA copy of the side path" if m.distill.ema_teacher is not None else "the live side path (detached)"
    return text.replace("The backbone path gets no distillation term from the side path.",
                        f"The backbone path learns from {teacher} on the matched queries: the side path's box and "
                        f"scores teach the backbone path's ({how}, weight {cfg.vg.logits_weight:g}).")


def metrics_table(results: dict[str, Any]) -> str:
    """precision@0.5 (IoU / GIoU) per split, parameters, QPS and latency per deployment, then the bare model,
    the best constant box and what the annotations had."""
    eff, splits = results["efficiency"], results["split"].split(",")
    deployments = [("deployed" if results["method"] != "mdpd" else "faded (deployed)", results["metrics"],
                    eff["inference_params"], eff["infer_qps"], eff.get("latency_ms"))]
    if results.get("metrics_side_kept"):
        deployments.append(("side kept", results["metrics_side_kept"], eff["inference_params_side_kept"],
                            eff["infer_qps_side_kept"], eff.get("latency_ms_side_kept")))
    rows = []
    for name, m, params, qps, ms in deployments:
        row: dict[str, Any] = {"model": name}
        row.update({f"{s} P@0.5 IoU / GIoU": f"{m[f'{s}_iou']} / {m[f'{s}_giou']}" for s in splits})
        first = splits[0]
        at_k = [f"{m[f'{first}_p_at_{k}']}" for k in (5, 10) if f"{first}_p_at_{k}" in m]
        row[f"{first} P@5 / P@10 (MDETR)"] = " / ".join(at_k) or "-"
        rows.append({**row, "infer params (M)": round(params / 1e6, 2), "QPS": qps, "ms / batch": ms or "-"})
    rows.append({"model": "bare model (reference)", "infer params (M)": "-", "QPS": eff.get("infer_qps_bare") or "-",
                 "ms / batch": eff.get("latency_ms_bare") or "-"})
    base = results["constant_box_baseline"]
    rows.append({"model": "best constant box", **{f"{s} P@0.5 IoU / GIoU": f"{base['precision'][s]} / -"
                                                  for s in splits}})
    problems = "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in p.items() if v)
                         for k, p in results["problems"].items() if any(p.values())) or "none"
    notes = [f"latency: one batch of {eff['timed_items']} expressions; placement {results['placement']}"
             + ("; trained on cached frozen features" if results["cached_features"] else ""),
             f"annotations clipped / skipped: {problems}"]
    return markdown_table(rows) + "\n\n" + "\n".join(notes)


def compare_columns(r: dict[str, Any]) -> dict[str, Any]:
    """Grounding's columns of a --compare row: P@0.5 (IoU) per split, GIoU on the headline split, latency."""
    m, eff = r["metrics"], r["efficiency"]
    out = {f"{s} IoU": m[f"{s}_iou"] for s in r["split"].split(",")}
    out["P@0.5 GIoU"] = m["precision_giou"]
    out["ms / batch"] = eff.get("latency_ms")
    out["x bare"] = round(eff["latency_ms"] / eff["latency_ms_bare"], 3) if eff.get("latency_ms_bare") else "-"
    return out


def use_snippet(export_dir: Path | None, data: GroundingData) -> str:
    """The card's "Use" code: reload the export, ground two test expressions, print the boxes."""
    if export_dir is None:
        return ("# not exported: this method's deployed model is not a plain backbone + head\n"
                "# (side-kept networks and unmergeable adapters change the backbone)")
    split = data.evals[-1]
    images = [kit.shown_path(split.paths[0]), kit.shown_path(split.paths[-1])]
    expressions = [split.sentences[0], split.sentences[-1]]
    return (f"from mdpd_vl.export import load_exported\n\n"
            f"model = load_exported({kit.shown_path(export_dir)!r})  # MDETR + its preprocessing\n"
            f"boxes = model.ground({images!r}, {expressions!r})  # one image per expression\n"
            f"print(boxes)  # N x 4 pixel boxes (x1, y1, x2, y2) in each image's own pixels")


def write_card(out: Path, results: dict[str, Any], data: GroundingData) -> Path:
    """MODEL_CARD.md of a grounding run."""
    export_dir = Path(results["export_dir"]) if results["export_dir"] else None
    layout = ("image CNN + text encoder (backbone each) and the MDETR transformer (encoder over both, decoder "
              "with learned queries, box and score heads)" if results["placement"] == "backbones" else
              "the pre-trained MDETR (image CNN, text encoder, transformer) and its box and score heads")
    return kit.write_card(
        out, results, title=f"Grounding {results['method']} on {results['dataset']}",
        task_words="referring-expression grounding (top-scoring box per expression)",
        deployed_summary=f"{layout}, with the preprocessing it was evaluated with; no side network.",
        metrics_table=metrics_table(results), use_snippet=use_snippet(export_dir, data),
        objective=results["objective"],
        data=f"{results['dataset']}, trained on `{results['config']['data']['train_split']}`; evaluated on "
             f"{results['split'].replace(',', ', ')}; examples: `{Path(results['examples_png']).name}`.")
