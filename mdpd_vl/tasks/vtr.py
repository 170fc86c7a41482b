"""Video-text retrieval with CLIP4Clip on any tuning method: `python -m mdpd_vl.tasks.vtr`.

With no arguments: the synthetic shapes videos (written in MSR-VTT's original format and built when
absent), the offline pre-trained pair (EfficientNet-Lite0 per frame + MiniLM), MDPD, `meanP`; trains
on a CPU in minutes, evaluates the faded model and the side-kept one, exports the faded model (frame
and text encoders, similarity head, frame sampling + preprocessing:
`mdpd_vl.export.load_exported(folder).encode_videos / encode_texts`) and writes a model card. With
`--dataset msrvtt` (train 9k, test JSFUSION 1k-A) or `--dataset msvd` (CLIP4Clip's multi-sentence
test) it is the real recipe (data from `data_prep/<dataset>.py`).

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

from mdpd_vl.data.video import BACKENDS, SHORT_POLICIES
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.engine.config import TrainConfig, dump_config
from mdpd_vl.engine.train import train
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks import vtr_eval as ev
from mdpd_vl.tasks.vtr_model import VideoTextRetrieval, VTRConfig, build_vtr_model
from mdpd_vl.tuning.config import MethodConfig

DATASETS = ("shapes", "msrvtt", "msvd")
SHAPES_PROTOCOLS = ("msrvtt", "msvd")
# What each real dataset changes from the defaults when no --config is given (configs/vtr/ spells
# everything out): CLIP4Clip's published training (5 epochs, batch 128, lr 1e-4 with 10% warm-up and
# cosine decay, Adam betas 0.9/0.98, eps 1e-6, 12 frames at 1 fps, 32 tokens; MSR-VTT with
# --expand_msrvtt_sentences) at the backbone's own input size, with the paper's weight decay 1e-2
# (its Table A for VTR; CLIP4Clip's own prep_optimizer uses 0.2); the backbone norms train (no
# frozen-feature cache).
REAL = ["data.image_size=null", "train.epochs=5", "train.batch_size=128", "train.lr=1e-4", "train.warmup_ratio=0.1",
        "train.betas=[0.9, 0.98]", "train.eps=1e-6", "train.weight_decay=0.01", "train.num_workers=4",
        "data.cache_features=false", "method.distill.backbone_trainable=norms_all", "method.d=null"]
DATASET_PRESETS: dict[str, list[str]] = {"shapes": [], "msrvtt": [*REAL, "data.expand_sentences=true"], "msvd": REAL}


@dataclass
class DataConfig:
    """Where the videos are, which frames are read and how they are fed."""

    dataset: str = field(default="shapes", metadata={"help": "shapes | msrvtt | msvd"})
    root: str | None = field(default=None, metadata={"help": "data root; null = $MDPD_DATA or ./data"})
    shapes_protocol: str = field(
        default="msrvtt", metadata={"help": "shapes videos in MSR-VTT's layout (one test sentence per video) or "
                                            "MSVD's (multi-sentence test): msrvtt | msvd"})
    shapes_scale: str = field(default="default", metadata={"help": "shapes world size: tiny | default | large"})
    shapes_seed: int = field(default=0, metadata={"help": "seed of the shapes world"})
    train_split: str = field(default="train", metadata={"help": "index split to train on (MSR-VTT: the 9k)"})
    eval_split: str = field(default="test", metadata={"help": "index split to evaluate (MSR-VTT: JSFUSION 1k-A)"})
    max_frames: int = field(default=12, metadata={"help": "frames per video (CLIP4Clip --max_frames)"})
    fps: int | None = field(
        default=1, metadata={"help": "frames read per second before the linspace slice (CLIP4Clip "
                                     "--feature_framerate); null = uniform over all frames"})
    slice_framepos: int = field(default=2, metadata={"help": "too many frames: 0 head, 1 tail, 2 uniform (CLIP4Clip)"})
    short: str = field(default="mask", metadata={"help": "a video with fewer frames: mask | repeat | skip"})
    backend: str = field(default="auto", metadata={"help": "video decoder: auto (decord, else PyAV) | decord | av"})
    image_size: int | None = field(default=128, metadata={"help": "frame side in pixels; null = backbone's own"})
    max_text_len: int = field(default=32, metadata={"help": "caption tokens kept (CLIP4Clip --max_words)"})
    expand_sentences: bool = field(
        default=False, metadata={"help": "MSR-VTT: one sample per (video, caption), all 20 captions "
                                         "(CLIP4Clip --expand_msrvtt_sentences); MSVD always does"})
    frame_cache: bool = field(
        default=False, metadata={"help": "write the sampled uint8 frames once (under cache_dir/frames), so "
                                         "later epochs and runs decode nothing"})
    cache_features: bool = field(
        default=True, metadata={"help": "cache frozen per-frame features where exact (see tasks/vtr.md)"})
    cache_dir: str | None = field(default=None, metadata={"help": "null = $MDPD_CACHE or <root>/cache"})
    eval_batch_size: int = field(default=16, metadata={"help": "videos (or captions) per batch when encoding"})
    max_train_samples: int | None = field(default=None, metadata={"help": "train on the first N samples only"})

    def __post_init__(self) -> None:
        if self.shapes_protocol not in SHAPES_PROTOCOLS:
            raise UserError(f"unknown protocol {self.shapes_protocol!r}; valid: {', '.join(SHAPES_PROTOCOLS)}",
                            field="shapes_protocol")
        for name, valid in (("short", SHORT_POLICIES), ("backend", BACKENDS)):
            if getattr(self, name) not in valid:
                raise UserError(f"unknown choice {getattr(self, name)!r}; valid: {', '.join(valid)}",
                                field=name)
        if self.slice_framepos not in (0, 1, 2):
            raise UserError("must be 0 (head), 1 (tail) or 2 (uniform)", field="slice_framepos")
        for name in ("max_frames", "max_text_len", "eval_batch_size", "fps", "image_size", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UserError(f"must be a positive integer{'' if name in ('max_frames', 'max_text_len') else ' or null'}"
                                f", got {value!r}", field=name)


@dataclass
class VTRTaskConfig:
    """Everything one VTR run needs; `python -m mdpd_vl.tasks.vtr --help` lists the flags."""

    backbone: str = field(default="offline", metadata={"help": "offline | <open_clip name> | hf:<name or folder>"})
    pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag or checkpoint path"})
    output_dir: str = field(default="runs/vtr", metadata={"help": "run folder (results, checkpoints, export)"})
    data: DataConfig = field(default_factory=DataConfig)
    # side width 192 for both towers (as ITR: the EfficientNet default would be 1280 / r = 640); MDPD
    # tunes the backbone head only by default: no backward through the backbones, frozen per-frame
    # features cacheable (tasks/vtr.md).
    method: MethodConfig = field(
        default_factory=lambda: MethodConfig(d=192, distill=DistillConfig(backbone_trainable="head"))
    )
    vtr: VTRConfig = field(default_factory=VTRConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=30, batch_size=16, lr=1e-3, warmup_ratio=0.1, schedule="cosine",
                                            log_every=10, ckpt_every=0)
    )
    group_lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "learning rate per parameter group suffix, e.g. backbone_norms: 1e-4"}
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.tasks.vtr", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--max-frames", help="frames per video (default 12, CLIP4Clip's)")
    p.add_argument("--sim", help="similarity head: meanP | seqTransf")
    kit.add_arguments(p, "mdpd | unipt | sherl | lst | lora | adapter | bitfit | partial | linear | full")
    return p.parse_args(argv)


FLAGS = {**kit.COMMON_FLAGS, "dataset": "data.dataset", "data_root": "data.root", "max_frames": "data.max_frames",
         "sim": "vtr.sim"}


def resolve_config(args: argparse.Namespace) -> VTRTaskConfig:
    """Defaults < dataset preset < --config file < flags < --set overrides; errors name the option."""
    return kit.resolve_config(VTRTaskConfig, args, FLAGS, DATASET_PRESETS.get(args.dataset or "shapes", []))


def index_dir(cfg: VTRTaskConfig) -> Path:
    """The folder holding `<split>.index.json`, building the shapes videos when they are absent."""
    root = common.data_root(cfg.data.root)
    if cfg.data.dataset == "shapes":
        from mdpd_vl.data.shapes_world import TASK_DIRS, ensure_shapes

        protocol = cfg.data.shapes_protocol
        world = ensure_shapes(root / "shapes", cfg.data.shapes_scale, cfg.data.shapes_seed, tasks=[protocol])
        return world / TASK_DIRS[protocol]
    if cfg.data.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.data.dataset!r}; valid: {', '.join(DATASETS)}", field="data.dataset")
    folder = root / cfg.data.dataset
    for split in (cfg.data.train_split, cfg.data.eval_split):
        if not (folder / f"{split}.index.json").is_file():
            raise UserError(
                f"no {split} index: prepare the data first with `python data_prep/{cfg.data.dataset}.py "
                f"--raw <download folder> --out {folder}`", where=str(folder / f"{split}.index.json"))
    return folder


def build_model(cfg: VTRTaskConfig) -> VideoTextRetrieval:
    """Backbone pair -> CLIP4Clip heads -> the tuning method on each tower."""
    from mdpd_vl.backbones import build_pair

    if cfg.vtr.sim == "seqTransf" and cfg.data.max_frames > cfg.vtr.max_positions:
        raise UserError(f"{cfg.data.max_frames} frames exceed seqTransf's {cfg.vtr.max_positions} frame positions "
                        "(vtr.max_positions)", field="data.max_frames")
    image_bb, text_bb = build_pair(cfg.backbone, cfg.pretrained)
    return build_vtr_model(image_bb, text_bb, cfg.method, cfg.vtr)


def objective(cfg: VTRTaskConfig) -> str:
    """What the run optimises, in words (`tuning.describe_objective` with CLIP4Clip's loss)."""
    from mdpd_vl.tuning.objective import describe_objective

    v = cfg.vtr
    crossing = v.objective == "cross_relational"
    return describe_objective(cfg.method, {
        "task_loss": "CLIP4Clip's symmetric cross-entropy over the in-batch text x video logits (learnable "
                     "logit scale)", "backbone_task": crossing, "cross_relational": v.cross_relational if crossing else 0,
        "rel_temperature": v.rel_temperature})


def run(cfg: VTRTaskConfig, command: str, output_dir: Path | None = None) -> dict[str, Any] | None:
    """Train, evaluate, export one method; returns the results dict (also written to results.json).
    Several processes: all train; the main one alone evaluates, times, exports and writes (kit)."""
    timings = kit.Timings()
    common.seed_everything(cfg.train.seed)
    with timings.phase("backbones + method"):
        if cfg.data.dataset != "shapes":
            index_dir(cfg)  # a missing real dataset is one line, before any backbone is loaded
        model = build_model(cfg)  # bad names fail here, before the shapes world is built or anything is written
    with timings.phase("data: shapes world / indexes"):
        folder = index_dir(cfg)
    out = kit.output_dir(output_dir or cfg.output_dir)
    cached = cfg.data.cache_features and kit.frozen_features_exact(cfg.method)
    with timings.phase("data: feature cache" if cached else "data"):
        data = ev.VideoData.build(cfg, model, folder)
        if data.cached:  # the backbones never change: their eval-split features serve every evaluation
            kit.on_main(lambda: data.freeze_eval_inputs(ev.retriever(model, cfg, data)))
    kit.show(f"vtr: {cfg.method.name} on {cfg.data.dataset} ({len(data.train_set)} training samples, "
             f"{len(data.video_paths)} test videos), backbone {cfg.backbone}, {cfg.vtr.sim}"
             f"{', cached frozen features' if data.cached else ''}")
    with timings.phase("evaluation before training"):
        before = kit.on_main(lambda: ev.evaluate(ev.retriever(model, cfg, data), data))

    def step_fn(m: VideoTextRetrieval, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        data.stats.add_batch(batch)  # skipped / short videos and reading time, counted in every worker
        losses = m.losses(batch)
        return {"loss": sum(losses.values()), **losses}

    groups = kit.optimizer_groups(model.param_groups(), cfg.group_lr)
    with timings.phase("training"):
        t0 = time.perf_counter()
        result = train(model, step_fn, data.train_set, data.collate, groups, cfg.train, out / "train", resume="auto",
                       config=dump_config(cfg))
        train_seconds = time.perf_counter() - t0
    data.finish()
    return kit.on_main(_finish, cfg, command, model, data, out, before, result, train_seconds, timings)


def _finish(cfg: VTRTaskConfig, command: str, model: VideoTextRetrieval, data: ev.VideoData, out: Path,
            before: dict[str, float], result: Any, train_seconds: float, timings: kit.Timings) -> dict[str, Any]:
    """After training, on the main process: evaluate, export, measure, write results.json + card, summary."""
    with timings.phase("evaluation"):
        deployed = ev.retriever(model, cfg, data)
        metrics = ev.evaluate(deployed, data)
        side = ev.evaluate(ev.retriever(model, cfg, data, side_kept=True), data) if model.is_mdpd else None
    with timings.phase("export"):
        export_dir = kit.export(deployed, out / "export")
    with timings.phase("efficiency: memory + throughput"):
        efficiency = ev.efficiency(model, data, cfg, deployed)
    results = kit.results(
        task="vtr", dataset=cfg.data.dataset, split=cfg.data.eval_split, method=cfg.method.name,
        backbone=cfg.backbone, metrics=metrics, metrics_side_kept=side, metrics_before_training=before,
        efficiency=efficiency, train_seconds=train_seconds, timings=timings, command=command,
        config=dump_config(cfg), train_result=result, train_steps=result.step, cached_features=data.cached,
        multi_sentence=data.multi_sentence, data_stats=data.stats.record(), objective=objective(cfg),
        init=model.init_report, export_dir=str(export_dir) if export_dir else None,
        feature_cache=str(data.cache_dir) if data.cache_dir else None)
    kit.write_results(out, results)
    card = ev.write_card(out, results, data)
    where = kit.locations(out, export_dir, card, data.cache_dir)
    if data.frame_cache is not None and data.frame_cache.dir is not None:
        frames = data.frame_cache.dir
        where.append(("frame cache", f"{frames}  ({kit.dir_bytes(frames) / 1e6:.1f} MB of sampled uint8 frames; "
                                     f"delete with: rm -r {frames})"))
    kit.show(kit.summary(results, ev.metrics_table(results), where))
    return results


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    return kit.main(args, cfg, run, module="mdpd_vl.tasks.vtr", flags=FLAGS, argv=argv,
                    in_dirs={"--data-root": common.data_root(cfg.data.root)}, columns=kit.qps_columns)


if __name__ == "__main__":
    raise SystemExit(main())
