"""Referring-expression grounding with MDETR on any tuning method: `python -m mdpd_vl.tasks.vg`.

With no arguments: the shapes world's referring expressions (written in refer's RefCOCO format and built
when absent), the offline pre-trained pair (EfficientNet-Lite0 grid + MiniLM tokens), MDPD with the side
networks over the two backbones and the MDETR transformer trained as the head (placement A: nothing
pre-trains MDETR offline); trains on a CPU in minutes, evaluates the faded model and the side-kept one
with precision@0.5 (IoU, and MDETR's GIoU variant) on val / testA / testB, prints the best constant box,
draws a dozen test images with their boxes (`examples.png`), exports the faded model
(`mdpd_vl.export.load_exported(folder).ground(images, expressions)` -> pixel boxes), writes an MDETR
checkpoint of plain models (`mdetr/`) and a model card.

`--pretrained FILE` is UniPT's placement (B): the method runs over the encoder and decoder layers of a
pre-trained MDETR (an official ashkamath/mdetr `.pth` or the `mdetr/` folder a run of this recipe wrote),
whose transformer is frozen except what `method.distill.backbone_trainable` names. `--dataset refcoco
--variant refcoco|refcoco+|refcocog` is the real recipe (data from `data_prep/refcoco.py`).

Recipe: setup (config, backbones, method, data) -> train (one engine loop) -> evaluate -> export; the
outputs (results.json, efficiency, card, summary with the time breakdown, `--compare` table) come from
the kit.
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
from mdpd_vl.engine.train import train
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.heads.grounding import GroundingConfig
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks import vg_eval as ev
from mdpd_vl.tasks.vg_model import GroundingModel, VGConfig, backbones_placement, load_pretrained
from mdpd_vl.tuning.config import MethodConfig

DATASETS = ("shapes", "refcoco")
VARIANTS = ("refcoco", "refcoco+", "refcocog")
SPLIT_BY = ("unc", "umd", "google")
# The evaluation splits of each variant (MDETR configs/refcoco*.json; refcocog: the umd split).
EVAL_SPLITS = {"refcoco": ["val", "testA", "testB"], "refcoco+": ["val", "testA", "testB"], "refcocog": ["val", "test"]}
# Real data (configs/vg/ spells it out): MDETR's ResNet-101 (+ roberta-base, the text default) and its
# transformer (main.py defaults: d 256, 6 + 6 layers, FFN 2048, 100 queries, 255 token slots, auxiliary
# losses), its box-respecting crop half of the time (datasets/coco.py make_coco_transforms, cautious),
# 640 px inputs, the backbone norms tuned (no frozen-feature cache); the paper's VG schedule
# (supplementary Table A: AdamW lr 5e-4, betas 0.9/0.999, weight decay 0, batch 8, 10 epochs, linear warm-up).
REAL = ["backbone=timm:resnet101", "data.max_text_len=40", "data.image_size=640", "data.crop_prob=0.5",
        "data.cache_features=false", "train.epochs=10", "train.batch_size=8", "train.lr=5e-4",
        "train.weight_decay=0.0", "train.schedule=linear", "train.warmup_ratio=0.05", "grounding.d_model=256",
        "grounding.nheads=8", "grounding.enc_layers=6", "grounding.dec_layers=6", "grounding.dim_feedforward=2048",
        "grounding.num_queries=100", "grounding.num_tokens=255", "grounding.aux_loss=true",
        "method.distill.backbone_trainable=norms_all", "method.distill.feature_layers=all", "method.d=null"]
DATASET_PRESETS: dict[str, list[str]] = {"shapes": [], "refcoco": REAL}


@dataclass
class DataConfig:
    """Where the referring expressions are, which splits train and evaluate, and how they are fed."""

    dataset: str = field(default="shapes", metadata={"help": "shapes | refcoco (RefCOCO / RefCOCO+ / RefCOCOg)"})
    variant: str = field(default="refcoco", metadata={"help": "refcoco | refcoco+ | refcocog"})
    split_by: str | None = field(default=None, metadata={"help": "unc | umd | google; null = unc (umd for refcocog)"})
    root: str | None = field(default=None, metadata={"help": "data root; null = $MDPD_DATA or ./data"})
    train_split: str = field(default="train", metadata={"help": "index split to train on"})
    eval_splits: list[str] | None = field(
        default=None, metadata={"help": "splits to evaluate; null = val, testA, testB (refcocog: val, test)"})
    image_size: int = field(default=128, metadata={"help": "input side in pixels (resized without cropping)"})
    crop_prob: float = field(default=0.0, metadata={"help": "training: MDETR's box-respecting random crop rate"})
    max_text_len: int = field(default=24, metadata={"help": "expression tokens kept (special tokens included)"})
    shapes_scale: str = field(default="default", metadata={"help": "shapes world size: tiny | default | large"})
    shapes_seed: int = field(default=0, metadata={"help": "seed of the shapes world"})
    max_train_expressions: int | None = field(default=None, metadata={"help": "train on the first N only"})
    cache_features: bool = field(
        default=True, metadata={"help": "cache the frozen backbones' per-layer features where exact "
                                        "(placement A: linear, side-kept methods, mdpd head)"})
    cache_dir: str | None = field(default=None, metadata={"help": "null = $MDPD_CACHE or <root>/cache"})
    eval_batch_size: int = field(default=64, metadata={"help": "expressions per batch when grounding"})
    timed_batch: int = field(default=16, metadata={"help": "expressions per batch of the latency measurement"})
    examples: int = field(default=12, metadata={"help": "test images drawn with their boxes (examples.png)"})

    def __post_init__(self) -> None:
        for name, valid in (("dataset", DATASETS), ("variant", VARIANTS)):
            if getattr(self, name) not in valid:
                raise UserError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}", field=name)
        if self.split_by is not None and self.split_by not in SPLIT_BY:
            raise UserError(f"unknown split {self.split_by!r}; valid: {', '.join(SPLIT_BY)}", field="split_by")
        for name in ("image_size", "max_text_len", "eval_batch_size", "timed_batch", "examples",
                     "max_train_expressions"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"must be a positive integer, got {value!r}", field=name)
        if not 0.0 <= self.crop_prob <= 1.0:
            raise UserError(f"must lie in [0, 1], got {self.crop_prob!r}", field="crop_prob")
        if self.eval_splits is not None and not self.eval_splits:
            raise UserError("name at least one split to evaluate (or null for the variant's)", field="eval_splits")

    @property
    def splits(self) -> list[str]:
        return list(self.eval_splits or EVAL_SPLITS[self.variant])


def _small_mdetr() -> GroundingConfig:
    # the CPU default: MDETR's layout at a width and depth a CPU trains in minutes (shapes scenes hold
    # at most a handful of things, expressions a dozen tokens); REAL restores MDETR's own sizes
    return GroundingConfig(d_model=128, nheads=4, enc_layers=2, dec_layers=2, dim_feedforward=256, num_queries=10,
                           num_tokens=32, aux_loss=True)


@dataclass
class VGRunConfig:
    """Everything one grounding run needs; `python -m mdpd_vl.tasks.vg --help` lists the flags."""

    backbone: str = field(default="offline", metadata={"help": "image CNN: offline | timm:<name> (e.g. resnet101)"})
    text_backbone: str | None = field(
        default=None, metadata={"help": "text encoder (transformers name or folder); null = MiniLM offline with the "
                                        "offline image backbone, roberta-base (MDETR's) otherwise"})
    pretrained: str | None = field(
        default=None, metadata={"help": "a pre-trained MDETR (official .pth or a run's mdetr/ folder): placement B, "
                                        "the method over its encoder and decoder layers"})
    output_dir: str = field(default="runs/vg", metadata={"help": "run folder (results, checkpoints, export)"})
    data: DataConfig = field(default_factory=DataConfig)
    grounding: GroundingConfig = field(default_factory=_small_mdetr)
    vg: VGConfig = field(default_factory=VGConfig)
    # MDPD tunes the towers' heads only by default (the MDETR transformer is the head): no backward
    # through the backbones, their frozen features cacheable; side width 96 for both towers; feature
    # distillation on layers 2-5 of each tower (the image CNN's first two stages hold 4096 and 1024
    # tokens at 128 px: imitating them costs 5x a training step and the box head never reads them)
    method: MethodConfig = field(
        default_factory=lambda: MethodConfig(d=96, distill=DistillConfig(backbone_trainable="head",
                                                                          feature_layers=[2, 3, 4, 5])))
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=4, batch_size=32, lr=5e-4, weight_decay=1e-4, warmup_ratio=0.05,
                                            schedule="cosine", max_grad_norm=0.1, log_every=20, ckpt_every=0))
    group_lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "learning rate per parameter group suffix, e.g. backbone_norms: 1e-4"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.tasks.vg", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--split-by", choices=SPLIT_BY)
    p.add_argument("--data-root")
    p.add_argument("--text-backbone")
    kit.add_arguments(p, "mdpd | unipt | sherl | lst | lora | adapter | bitfit | partial | linear | full; "
                         "--compare also takes mdpd:<head|norms_last_k|norms_all>[+ckpt]")
    return p.parse_args(argv)


FLAGS = {**kit.COMMON_FLAGS, "dataset": "data.dataset", "variant": "data.variant", "split_by": "data.split_by",
         "data_root": "data.root", "text_backbone": "text_backbone"}


def resolve_config(args: argparse.Namespace) -> VGRunConfig:
    """Defaults < dataset preset < --config file < flags < --set overrides; errors name the option.
    A pre-trained MDETR (`--pretrained`) is placement B."""
    cfg = kit.resolve_config(VGRunConfig, args, FLAGS, DATASET_PRESETS.get(args.dataset or "shapes", []))
    if cfg.pretrained:
        cfg.vg.placement = "transformer"
        if not args.config and "method.distill.feature_layers" not in kit.user_labels(args, FLAGS):
            cfg.method.distill.feature_layers = "all"  # placement A's default names tower layers; B has its own
    elif cfg.vg.placement == "transformer":
        raise UserError("placement transformer tunes a pre-trained MDETR: give it with --pretrained FILE",
                        field="--pretrained")
    return cfg


# ----------------------------------------------------------------------------- one method
def build_backbones(cfg: VGRunConfig) -> tuple[Any, Any]:
    """(image CNN, text encoder) of placement A from the run's names."""
    from mdpd_vl.backbones import offline
    from mdpd_vl.backbones.hf import HFText

    if cfg.backbone == "offline":
        image: Any = offline.offline_image_backbone()
    elif cfg.backbone.startswith("timm:"):
        from mdpd_vl.backbones.timm import TimmCNN

        image = TimmCNN(cfg.backbone[len("timm:"):], pretrained=True)
    else:
        raise UserError(f"unknown image backbone {cfg.backbone!r}: use offline or timm:<name> (e.g. timm:resnet101)",
                        field="backbone")
    name = cfg.text_backbone or ("offline" if cfg.backbone == "offline" else "roberta-base")
    if name == "offline":
        return image, offline.offline_text_backbone()
    return image, HFText(name, local_files_only=Path(name).is_dir())


def build_model(cfg: VGRunConfig) -> GroundingModel:
    """Placement A (backbones + method + MDETR transformer head) or B (the method over a pre-trained MDETR)."""
    if cfg.vg.placement == "transformer":
        assert cfg.pretrained
        return load_pretrained(Path(cfg.pretrained), cfg.method, cfg.grounding, cfg.vg, cfg.text_backbone)
    image, text = build_backbones(cfg)
    return backbones_placement(image, text, cfg.method, cfg.grounding, cfg.vg)


def index_dir(cfg: VGRunConfig) -> Path:
    """The folder holding `<split>.index.json`, building the shapes world's expressions when absent."""
    root = common.data_root(cfg.data.root)
    if cfg.data.dataset == "shapes":
        from mdpd_vl.data.shapes_world import TASK_DIRS, ensure_shapes

        return ensure_shapes(root / "shapes", cfg.data.shapes_scale, cfg.data.shapes_seed,
                             tasks=["refcoco"]) / TASK_DIRS["refcoco"]
    folder = root / cfg.data.variant
    for split in (cfg.data.train_split, *cfg.data.splits):
        if not (folder / f"{split}.index.json").is_file():
            split_by = cfg.data.split_by or ("umd" if cfg.data.variant == "refcocog" else "unc")
            raise UserError(f"no {split} index: prepare the data first with `python data_prep/refcoco.py --raw "
                            f"<refer folder> --out {folder} --variant {cfg.data.variant} --split-by {split_by}`",
                            where=str(folder / f"{split}.index.json"))
    return folder


def run(cfg: VGRunConfig, command: str, output_dir: Path | None = None) -> dict[str, Any] | None:
    """Train, evaluate, export one method; returns the results dict (also written to results.json).
    Several processes: all train; the main one alone evaluates, times, exports and writes (kit)."""
    timings = kit.Timings()
    common.seed_everything(cfg.train.seed)
    with timings.phase("backbones + method"):
        if cfg.data.dataset != "shapes":
            index_dir(cfg)  # a missing real dataset is one line, before any backbone is loaded
        model = build_model(cfg)
    with timings.phase("data: shapes world / indexes"):
        folder = index_dir(cfg)
    out = kit.output_dir(output_dir or cfg.output_dir)
    cached = cfg.data.cache_features and ev.cache_is_exact(cfg)
    with timings.phase("data: feature cache" if cached else "data"):
        data = ev.GroundingData.build(cfg, model, folder, cached)
    kit.show(f"vg: {cfg.method.name} on {cfg.data.dataset}/{cfg.data.variant} (placement {cfg.vg.placement}; "
             f"{len(data.train_set)} training expressions, eval {data.split_sizes()}), backbone {cfg.backbone}"
             f"{', cached frozen features' if data.cached else ''}")
    kit.show(f"best constant box (chosen on {cfg.data.train_split}): {data.baseline_line()}")

    def step_fn(m: GroundingModel, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        losses = m.losses(batch)
        return {"loss": sum(losses.values()), **losses}

    with timings.phase("training"):
        t0 = time.perf_counter()
        result = train(model, step_fn, data.train_set, data.collate, kit.optimizer_groups(model.param_groups(),
                       cfg.group_lr), cfg.train, out / "train", resume="auto", config=dump_config(cfg))
        train_seconds = time.perf_counter() - t0
    return kit.on_main(_finish, cfg, command, model, data, out, result, train_seconds, timings)


def _finish(cfg: VGRunConfig, command: str, model: GroundingModel, data: Any, out: Path, result: Any,
            train_seconds: float, timings: kit.Timings) -> dict[str, Any]:
    """After training, on the main process: evaluate, export, measure, write results.json + card, summary."""
    with timings.phase("evaluation"):
        deployed = ev.grounder(model, data)
        metrics, preds = ev.evaluate(deployed, data)
        side = ev.evaluate(ev.grounder(model, data, side_kept=True), data)[0] if model.is_mdpd else None
        examples = ev.draw(data, preds, out / "examples.png")
        predictions = ev.write_predictions(out, data, preds)
    with timings.phase("export"):
        export_dir = kit.export(deployed, out / "export")
        checkpoint = ev.save_checkpoint(model, out / "mdetr")
    with timings.phase("efficiency: memory + latency"):
        efficiency = ev.efficiency(model, deployed, data, cfg)
    results = kit.results(
        task="vg", dataset=f"{cfg.data.dataset}/{cfg.data.variant}", split=",".join(cfg.data.splits),
        method=cfg.method.name, backbone=cfg.backbone, metrics=metrics, metrics_side_kept=side,
        metrics_before_training=None, efficiency=efficiency, train_seconds=train_seconds, timings=timings,
        command=command, config=dump_config(cfg), objective=ev.objective(cfg), placement=cfg.vg.placement,
        train_result=result, train_steps=result.step, cached_features=data.cached, constant_box_baseline=data.baseline,
        problems=data.problems(), examples_png=str(examples), predictions=predictions, export_dir=str(export_dir) if export_dir else None,
        mdetr_checkpoint=str(checkpoint) if checkpoint else None,
        feature_cache=str(data.cache_dir) if data.cache_dir else None)
    kit.write_results(out, results)
    card = ev.write_card(out, results, data)
    where = kit.locations(out, export_dir, card, data.cache_dir)
    where.insert(2, ("examples", f"{examples}  (expression, predicted box red, ground truth green)"))
    if checkpoint:
        where.insert(3, ("MDETR checkpoint", f"{checkpoint}  (--pretrained {checkpoint}: placement B)"))
    kit.show(kit.summary(results, ev.metrics_table(results), where))
    return results


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    in_dirs: dict[str, Any] = {"--data-root": common.data_root(cfg.data.root)}
    return kit.main(args, cfg, run, module="mdpd_vl.tasks.vg", flags=FLAGS, argv=argv, in_dirs=in_dirs,
                    metric=("precision", "P@0.5"), columns=ev.compare_columns, notes=kit.gains_table)


if __name__ == "__main__":
    raise SystemExit(main())
