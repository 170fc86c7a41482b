"""The ITR recipe's data assembly, evaluation, efficiency bill, export and reports."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Subset

from mdpd_vl.atomic import write_text as atomic_write_text
from mdpd_vl.cards import markdown_table, write_model_card
from mdpd_vl.data import retrieval_inputs as ri
from mdpd_vl.data.datasets import ImageTextEval
from mdpd_vl.data.transforms import clip_transform, transform_stats
from mdpd_vl.engine.memory import gib, measure_train_state
from mdpd_vl.eval.retrieval import evaluate_itr
from mdpd_vl.export import FadedModel, export_faded
from mdpd_vl.heads.retrieval import DualTowerRetrieval, encode
from mdpd_vl.tasks import common

if TYPE_CHECKING:
    from mdpd_vl.tasks.itr import ITRConfig

# Methods whose backbone never changes and whose backbone inputs are deterministic, so that
# per-layer features computed once are exactly what a live pass would give (tasks/itr.md).
CACHE_EXACT = ("linear", "unipt", "sherl", "lst")


def cache_is_exact(cfg: ITRConfig) -> bool:
    """Frozen-feature caching gives the same numbers as live passes for this method."""
    m = cfg.method
    return m.name in CACHE_EXACT or (m.name == "mdpd" and m.distill.backbone_trainable == "head")


@dataclass
class RetrievalData:
    """Training set + collate, the eval split, and batch iterators over it (live or cached)."""

    train_set: Any
    collate: Any
    evalset: ImageTextEval
    eval_images: Any  # callable -> iterable of image batches
    eval_texts: Any  # callable -> iterable of caption batches
    tokenize: Any
    cached: bool

    @classmethod
    def build(cls, cfg: ITRConfig, model: DualTowerRetrieval, folder: Path) -> RetrievalData:
        img_bb, txt_bb = model.image.backbone, model.text.backbone
        transform = eval_transform(img_bb, cfg.data.image_size)

        def tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
            return txt_bb.tokenize(texts, max_length=cfg.data.max_text_len)

        bs = cfg.data.eval_batch_size
        evalset = ImageTextEval(folder / f"{cfg.data.eval_split}.index.json", transform)
        cached = cfg.data.cache_features and cache_is_exact(cfg)

        if cached:
            cache = common.cache_dir(cfg.data.cache_dir, common.data_root(cfg.data.root))
            key = {"dataset": cfg.data.dataset, "folder": str(folder.resolve()), "size": cfg.data.image_size,
                   "max_text_len": cfg.data.max_text_len}
            train_split = ImageTextEval(folder / f"{cfg.data.train_split}.index.json", transform)
            t_img, t_txt, _ = ri.cache_split(img_bb, txt_bb, train_split, tokenize, cache,
                                             {**key, "split": cfg.data.train_split}, bs)
            e_img, e_txt, _ = ri.cache_split(img_bb, txt_bb, evalset, tokenize, cache,
                                             {**key, "split": cfg.data.eval_split}, bs)
            train_set: Any = ri.PairIndices(train_split.caption_to_image)
            collate: Any = ri.CachedPairCollate(t_img, t_txt)
            eval_images = lambda: ri.store_batches(e_img, bs)  # noqa: E731
            eval_texts = lambda: ri.store_batches(e_txt, bs)  # noqa: E731
        else:
            train_set = ri.train_pairs(folder / f"{cfg.data.train_split}.index.json", transform)
            collate = ri.LivePairCollate(tokenize)
            eval_images = lambda: ri.image_batches(evalset, bs)  # noqa: E731
            eval_texts = lambda: ri.caption_batches(evalset.captions, tokenize, bs)  # noqa: E731
        if cfg.data.max_train_pairs is not None:
            train_set = Subset(train_set, range(min(cfg.data.max_train_pairs, len(train_set))))
        return cls(train_set, collate, evalset, eval_images, eval_texts, tokenize, cached)


def eval_transform(backbone: Any, size: int | None) -> Any:
    """The backbone's own preprocessing, at `size` pixels when given (same mean/std)."""
    own = backbone.transform(False)
    if size is None:
        return own
    stats = transform_stats(own) or {}
    kw = {k: stats[k] for k in ("mean", "std") if k in stats}
    return clip_transform(size, **kw)


def evaluate(model: DualTowerRetrieval, data: RetrievalData, side_kept: bool, folds: int = 1) -> dict[str, float]:
    """Recall@K / Rsum of the deployed (faded) encoders, or of the side-kept ones.

    With `folds > 1` (COCO), the whole split is scored (5K) and the `<key>_<folds>fold` entries
    hold the average over contiguous folds (the 1K protocol)."""
    img_enc, txt_enc = model.deployed(side_kept=side_kept)
    img = encode(img_enc, data.eval_images())
    txt = encode(txt_enc, data.eval_texts())
    sims = (img @ txt.t()).numpy()
    c2i = data.evalset.caption_to_image
    out = {k: round(float(v), 2) for k, v in evaluate_itr(sims, c2i).items()}
    if folds > 1:
        out.update({f"{k}_{folds}fold": round(float(v), 2) for k, v in evaluate_itr(sims, c2i, folds=folds).items()})
    return out


def efficiency(model: DualTowerRetrieval, data: RetrievalData, cfg: ITRConfig) -> dict[str, Any]:
    """Parameter counts, the training-memory bill of one live step, and inference throughput."""
    batch = _live_batch(data, min(cfg.train.batch_size, 32))
    n = len(batch["image_index"])
    params = [p for group in model.param_groups().values() for p in group]
    opt = torch.optim.AdamW(params, lr=0.0)  # lr 0: the measuring step leaves the weights alone

    def closure() -> torch.Tensor:
        return sum(model.losses(batch["image"], batch["text"], batch["image_index"]).values())

    model.train()
    bill = measure_train_state(model, closure, params, opt)
    out: dict[str, Any] = {
        "trainable_params": sum(t.trainable_params for t in (model.image, model.text)),
        "inference_params": sum(t.inference_params for t in (model.image, model.text)),
        "train_state_bytes": bill["train_state_bytes"],
        "train_state_detail": bill,
        "measured_batch_size": n,
        "infer_qps_side_kept": None,
        "inference_params_side_kept": None,
    }
    # the untuned backbones alone (features only, no head) are the reference "fading costs nothing"
    encoders = {"infer_qps": model.deployed(False),
                "infer_qps_bare": (_Features(model.image.backbone), _Features(model.text.backbone))}
    if model.is_mdpd:
        encoders["infer_qps_side_kept"] = model.deployed(True)
        out["inference_params_side_kept"] = sum(sum(p.numel() for p in m.parameters()) for m in encoders[
            "infer_qps_side_kept"])
    out.update(_qps_interleaved(encoders, batch, n))
    return out


class _Features(torch.nn.Module):
    """A backbone's per-layer features only: what the bare backbone costs."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Any) -> list[torch.Tensor]:
        return self.backbone.features(x)


def _live_batch(data: RetrievalData, n: int) -> dict[str, Any]:
    images = next(iter(ri.image_batches(data.evalset, n)))
    caps = [data.evalset.captions[data.evalset.image_to_captions[i][0]] for i in range(len(images))]
    return {"image": images, "text": data.tokenize(caps), "image_index": torch.arange(len(images))}


@torch.no_grad()
def _qps_interleaved(encoders: dict[str, tuple[torch.nn.Module, torch.nn.Module]], batch: dict[str, Any], n: int,
                     rounds: int = 5) -> dict[str, float]:
    """Image-caption pairs encoded per second for each (image, text) encoder pair, batch `n`.

    The encoders are timed in turn, round after round, and each keeps its median: load that drifts
    during the measurement hits all of them alike, so their ratios stay meaningful."""
    for img_enc, txt_enc in encoders.values():
        img_enc.eval()
        txt_enc.eval()
    times: dict[str, list[float]] = {k: [] for k in encoders}
    for r in range(rounds + 1):
        for name, (img_enc, txt_enc) in encoders.items():
            t = common.median_seconds(lambda i=img_enc, t=txt_enc: (i(batch["image"]), t(batch["text"])), repeats=1,
                                      warmup=1 if r == 0 else 0)
            if r:  # round 0 warms every encoder up
                times[name].append(t)
    return {name: round(n / statistics.median(ts), 2) for name, ts in times.items()}


def export(model: DualTowerRetrieval, folder: Path, cfg: ITRConfig) -> Path | None:
    """Save the deployed towers with `mdpd_vl.export` when they are a plain backbone + head."""
    img_enc, txt_enc = model.deployed(False)
    if not (type(img_enc) is FadedModel and type(txt_enc) is FadedModel) or cfg.method.name in ("lora", "adapter"):
        return None  # side-kept and adapter-style methods change the backbone's architecture
    for name, enc in (("image", img_enc), ("text", txt_enc)):
        export_faded(enc, folder / name, extra_config={"task": "itr", "tower": name, "method": cfg.method.name,
                                                       "image_size": cfg.data.image_size,
                                                       "max_text_len": cfg.data.max_text_len})
    return folder


def summary_table(results: dict[str, Any]) -> str:
    """The end-of-run table: retrieval metrics and the efficiency bill per deployment."""
    eff = results["efficiency"]
    rows = []
    deployments = [("deployed" if results["method"] != "mdpd" else "faded (deployed)", results["metrics"],
                    eff["inference_params"], eff["infer_qps"])]
    if results.get("metrics_side_kept"):
        deployments.append(("side kept", results["metrics_side_kept"], eff["inference_params_side_kept"],
                            eff["infer_qps_side_kept"]))
    for name, m, params, qps in deployments:
        rows.append({"model": name, "i2t R@1": m["i2t_r1"], "R@5": m["i2t_r5"], "R@10": m["i2t_r10"],
                     "t2i R@1": m["t2i_r1"], "R@5 ": m["t2i_r5"], "R@10 ": m["t2i_r10"], "Rsum": m["rsum"],
                     "infer params (M)": round(params / 1e6, 2), "QPS": qps})
    bare = eff.get("infer_qps_bare")
    rows.append({"model": "bare backbones (reference)", "infer params (M)": "-", "QPS": bare or "-"})
    head = (f"{results['method']} on {results['dataset']} ({results['split']}): trainable "
            f"{eff['trainable_params'] / 1e6:.2f} M, training memory {gib(eff['train_state_bytes'])} "
            f"(train_state_bytes at batch {eff['measured_batch_size']}), {results['train_seconds']} s training"
            f"{', cached frozen features' if results['cached_features'] else ''}; Rsum before training "
            f"{results['metrics_before_training']['rsum']}")
    return head + "\n" + markdown_table(rows)


def write_card(out: Path, results: dict[str, Any]) -> None:
    eff = results["efficiency"]
    eff_rows = [{"trainable params": eff["trainable_params"], "inference params": eff["inference_params"],
                 "train_state_bytes": gib(eff["train_state_bytes"]), "infer QPS": eff["infer_qps"],
                 "infer QPS side kept": eff["infer_qps_side_kept"] or "-"}]
    write_model_card(out / "MODEL_CARD.md", {
        "title": f"ITR {results['method']} on {results['dataset']}", "task": "image-text retrieval",
        "method": results["method"], "deployed_summary": "two backbones with their VSE heads; no side network.",
        "export_dir": results["export_dir"] or "(not exported for this method)",
        "data": f"{results['dataset']}, trained on `{results['config']['data']['train_split']}`.",
        "dataset": results["dataset"], "split": results["split"],
        "metrics_table": summary_table(results), "efficiency_table": markdown_table(eff_rows),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "command": results["command"],
        "config": results["config"]})


def write_comparison(folder: Path, rows: list[dict[str, Any]], command: str) -> None:
    """compare.md (one table for all methods), compare.json and compare.png (Rsum vs memory)."""
    from mdpd_vl.tasks.itr_report import plot, row

    table = [row(r["method"], r) for r in rows]
    text = f"Measured by:\n\n```\n{command}\n```\n\n" + markdown_table(table) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "compare.md", text)
    common.write_json(folder / "compare.json", {"command": command, "rows": table})
    plot(folder / "compare.png", table)
    print(text)
