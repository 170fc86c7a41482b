"""Image-text retrieval with VSE-infinity on any tuning method: `python -m mdpd_vl.tasks.itr`.

With no arguments: the synthetic shapes world (its images and captions built when absent), the
offline pre-trained pair (EfficientNet-Lite0 + MiniLM), MDPD; trains on a CPU in minutes, evaluates
the faded model and the side-kept one, exports the faded model (both towers + preprocessing:
`mdpd_vl.export.load_exported(folder).encode_images / encode_texts`) and writes a model card. With
`--dataset flickr30k` or `--dataset coco` it is the real recipe (data from `data_prep/<dataset>.py`).

Recipe: setup (config, backbones, method, data) -> train (one engine loop) -> evaluate -> export;
the outputs (results.json, efficiency, card, summary with the time breakdown) come from the kit.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.engine.config import TrainConfig, dump_config
from mdpd_vl.engine.train import steps_per_epoch, train
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.heads.retrieval import RetrievalConfig
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks import itr_eval as ev
from mdpd_vl.tasks.retrieval import DualTowerRetrieval
from mdpd_vl.tuning import describe_objective
from mdpd_vl.tuning.config import MethodConfig

DATASETS = ("shapes", "flickr30k", "coco")
# What each dataset changes from the defaults when no --config is given (the configs/itr/ files
# spell everything out). Flickr30K: 1K test; COCO: 5K test reported as 5K and as 5 folds of 1K.
# Every dataset deploys the fading frontier's pick (tasks/fading.md, "Defaults chosen"): the backbone
# frozen, the image tower's W_B reading pooled features of the last layers besides the last one
# (`head_layers`), which came within 5% of merged LoRA's deployed Rsum at a third of its peak memory. The real datasets do not cache
# frozen features: ViT-B/32's per-layer tokens at 384 px, 2 bytes a value, take ~85 GB (Flickr30K), ~330 GB (COCO).
DATASET_PRESETS: dict[str, list[str]] = {
    "shapes": [],
    "flickr30k": ["data.image_size=384", "train.epochs=25", "train.batch_size=112", "retrieval.embed_dim=1024",
                  "data.cache_features=false"],
    "coco": ["data.image_size=384", "train.epochs=25", "train.batch_size=112", "retrieval.embed_dim=1024",
             "data.folds=5", "data.cache_features=false"],
}
# what the deployed W_B reads by default (tasks/fading.md): the image tower the last three layers, the text
# tower its last one (the text reads added little Rsum there and cost the FLOPs that the 1.02 x bound has not)
HEAD_LAYERS: dict[str, str] = {"image": "last_3"}


@dataclass
class DataConfig:
    """Where the data is and how it is fed."""

    dataset: str = field(default="shapes", metadata={"help": "shapes | flickr30k | coco"})
    root: str | None = field(default=None, metadata={"help": "data root; null = $MDPD_DATA or ./data"})
    train_split: str = field(default="train", metadata={"help": "index split to train on"})
    eval_split: str = field(default="test", metadata={"help": "index split to evaluate (Karpathy COCO test = 5K; precomp layout: testall)"})
    folds: int = field(default=1, metadata={"help": "COCO 1K protocol: 5 contiguous folds, averaged"})
    image_size: int | None = field(default=128, metadata={"help": "input side in pixels; null = backbone's own"})
    max_text_len: int = field(default=32, metadata={"help": "caption tokens kept"})
    shapes_scale: str = field(default="default", metadata={"help": "shapes world size: tiny | default | large"})
    shapes_seed: int = field(default=0, metadata={"help": "seed of the shapes world"})
    max_train_pairs: int | None = field(default=None, metadata={"help": "train on the first N pairs only"})
    cache_features: bool = field(
        default=True, metadata={"help": "cache frozen per-layer features where exact (see tasks/itr.md)"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "null = $MDPD_CACHE or <root>/cache"})
    eval_batch_size: int = field(default=128, metadata={"help": "batch size when encoding the test split"})


@dataclass
class ITRConfig:
    """Everything one ITR run needs; `python -m mdpd_vl.tasks.itr --help` lists the flags."""

    backbone: str = field(default="offline", metadata={"help": "offline | <open_clip name> | hf:<name or folder>"})
    pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag or checkpoint path"})
    output_dir: str = field(default="runs/itr", metadata={"help": "run folder (results, checkpoints, export)"})
    data: DataConfig = field(default_factory=DataConfig)
    # side width 192 for both towers (MiniLM: 384 / r); the EfficientNet default would be 1280 / r = 640,
    # which makes LST's ladder cost more than the backbone itself. MDPD tunes the backbone head only
    # by default: no backward through the backbones, frozen features cacheable (tasks/itr.md).
    method: MethodConfig = field(
        default_factory=lambda: MethodConfig(
            d=192, distill=DistillConfig(backbone_trainable="head", head_layers=dict(HEAD_LAYERS)))
    )
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=112, lr=5e-4, warmup_ratio=0.05, schedule="cosine",
                                            log_every=10, ckpt_every=0)
    )
    group_lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "learning rate per parameter group suffix, e.g. backbone_norms: 1e-4"}
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.tasks.itr", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None)
    kit.add_arguments(p, "mdpd | unipt | sherl | lst | lora | adapter | bitfit | partial | linear | full")
    return p.parse_args(argv)


FLAGS = {**kit.COMMON_FLAGS, "dataset": "data.dataset", "data_root": "data.root", "cache_features": "data.cache_features"}


def user_labels(args: argparse.Namespace) -> dict[str, str]:
    """Config key -> the option the user typed for it (`--method nonsense`, `--set train.lr=1`)."""
    return kit.user_labels(args, FLAGS)


def resolve_config(args: argparse.Namespace) -> ITRConfig:
    """Defaults < dataset preset < --config file < flags < --set overrides; errors name the option."""
    return kit.resolve_config(ITRConfig, args, FLAGS, DATASET_PRESETS.get(args.dataset or "shapes", []))


def index_dir(cfg: ITRConfig) -> Path:
    """The folder holding `<split>.index.json`, building the shapes world when it is absent."""
    root = common.data_root(cfg.data.root)
    if cfg.data.dataset == "shapes":
        from mdpd_vl.data.shapes_world import TASK_DIRS, ensure_shapes

        world = ensure_shapes(root / "shapes", cfg.data.shapes_scale, cfg.data.shapes_seed, tasks=["itr"])
        return world / TASK_DIRS["itr"]
    if cfg.data.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.data.dataset!r}; valid: {', '.join(DATASETS)}", field="data.dataset")
    folder = root / cfg.data.dataset
    for split in (cfg.data.train_split, cfg.data.eval_split):
        if not (folder / f"{split}.index.json").is_file():
            raise UserError(
                f"no {split} index: prepare the data first with `python data_prep/{cfg.data.dataset}.py "
                f"--raw <download folder> --out {folder}`", where=str(folder / f"{split}.index.json"))
    return folder


def build_model(cfg: ITRConfig) -> DualTowerRetrieval:
    """Backbone pair -> VSE heads -> the tuning method on each tower."""
    from mdpd_vl.backbones import build_pair
    from mdpd_vl.heads.gpo import VSEHead
    from mdpd_vl.tuning import apply_method

    image_bb, text_bb = build_pair(cfg.backbone, cfg.pretrained)
    r = cfg.retrieval

    def head(width: int) -> VSEHead:  # same head class for both towers; widths come from each backbone
        return VSEHead(width, r.embed_dim, token_drop=r.token_drop)

    towers = ("image", "text")  # the names a per-tower `distill.head_layers` may use
    image = apply_method(image_bb, head, cfg.method.for_tower("image", towers))
    return DualTowerRetrieval(image, apply_method(text_bb, head, cfg.method.for_tower("text", towers)), r)


def run(cfg: ITRConfig, command: str, output_dir: Path | None = None) -> dict[str, Any] | None:
    """Train, evaluate, export one method; returns the results dict (also written to results.json).

    Several processes (`torchrun` / `accelerate launch`): all of them train; the main one alone
    builds what is shared (shapes world, feature cache, run folder), evaluates, times, exports and
    writes, while the others wait (they return None)."""
    timings = kit.Timings()
    common.seed_everything(cfg.train.seed)
    with timings.phase("backbones + method"):
        if cfg.data.dataset != "shapes":
            index_dir(cfg)  # a missing real dataset is one line, before any backbone is loaded
        model = build_model(cfg)  # bad names fail here, before the shapes world is built or anything is written
    with timings.phase("data: shapes world / indexes"):
        folder = index_dir(cfg)
    out = kit.output_dir(output_dir or cfg.output_dir)
    with timings.phase("data: feature cache" if ev.cache_is_exact(cfg) and cfg.data.cache_features else "data"):
        data = ev.RetrievalData.build(cfg, model, folder)
        if data.cached:  # the backbones never change: their eval-split features serve every evaluation
            kit.on_main(lambda: data.freeze_eval_inputs(ev.retriever(model, cfg)))
    kit.show(f"itr: {cfg.method.name} on {cfg.data.dataset} ({len(data.train_set)} pairs), backbone {cfg.backbone}"
             f"{', cached frozen features' if data.cached else ''}")
    with timings.phase("evaluation before training"):
        before = kit.on_main(lambda: ev.evaluate(ev.retriever(model, cfg), data, cfg.data.folds))
    per_epoch = max(1, steps_per_epoch(len(data.train_set), cfg.train))  # optimizer steps, all processes

    def step_fn(m: DualTowerRetrieval, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        m.epoch = step // per_epoch  # VSE-infinity: all negatives first, hardest after
        losses = m.losses(batch["image"], batch["text"], batch["image_index"])
        return {"loss": sum(losses.values()), **losses}

    groups = [
        {"name": name, "params": params, **({"lr": lr} if (lr := _group_lr(cfg, name)) is not None else {})}
        for name, params in model.param_groups().items() if params
    ]
    with timings.phase("training"):
        t0 = time.perf_counter()
        result = train(model, step_fn, data.train_set, data.collate, groups, cfg.train, out / "train", resume="auto",
                       config=dump_config(cfg))
        train_seconds = time.perf_counter() - t0
    return kit.on_main(_finish, cfg, command, model, data, out, before, result, train_seconds, timings)


def _finish(cfg: ITRConfig, command: str, model: DualTowerRetrieval, data: ev.RetrievalData, out: Path,
            before: dict[str, float], result: Any, train_seconds: float, timings: kit.Timings) -> dict[str, Any]:
    """After training, on the main process: evaluate, export, measure, write results.json + card, summary."""
    with timings.phase("evaluation"):
        deployed = ev.retriever(model, cfg)
        metrics = ev.evaluate(deployed, data, cfg.data.folds)
        side = ev.evaluate(ev.retriever(model, cfg, side_kept=True), data, cfg.data.folds) if model.is_mdpd else None
    with timings.phase("export"):
        export_dir = kit.export(deployed, out / "export")
    with timings.phase("efficiency: memory + throughput"):
        efficiency = ev.efficiency(model, data, cfg, deployed)
    results = kit.results(
        task="itr", dataset=cfg.data.dataset, split=cfg.data.eval_split, method=cfg.method.name,
        backbone=cfg.backbone, metrics=metrics, metrics_side_kept=side, metrics_before_training=before,
        efficiency=efficiency, train_seconds=train_seconds, timings=timings, command=command,
        config=dump_config(cfg), objective=describe_objective(cfg.method, cfg.retrieval),
        train_result=result, train_steps=result.step, cached_features=data.cached,
        export_dir=str(export_dir) if export_dir else None,
        feature_cache=str(data.cache_dir) if data.cache_dir else None)
    kit.write_results(out, results)
    card = ev.write_card(out, results, data)
    where = kit.locations(out, export_dir, card, data.cache_dir)
    kit.show(kit.summary(results, ev.metrics_table(results), where))
    return results


def _group_lr(cfg: ITRConfig, group: str) -> float | None:
    for suffix, lr in cfg.group_lr.items():
        if group.endswith(suffix):
            return float(lr)
    return None


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    return kit.main(args, cfg, run, module="mdpd_vl.tasks.itr", flags=FLAGS, argv=argv,
                    in_dirs={"--data-root": common.data_root(cfg.data.root)})


if __name__ == "__main__":
    raise SystemExit(main())
