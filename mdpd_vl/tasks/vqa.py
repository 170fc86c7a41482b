"""Visual question answering with CLIP-ViL on any tuning method: `python -m mdpd_vl.tasks.vqa`.

With no arguments: the shapes world's VQA questions (built when absent), the offline pre-trained pair
(EfficientNet-Lite0 grid + MiniLM as the single-stream encoder), MDPD; trains on a CPU in minutes,
evaluates the faded model and the side-kept one with the official VQA accuracy (overall, yes/no,
number, other), prints the majority-answer baseline, exports the faded model
(`mdpd_vl.export.load_exported(folder).answer(images, questions)`) and writes a model card.
`--dataset vqav2` / `--dataset gqa` are the real recipes (data from `data_prep/vqav2.py` / `gqa.py`);
`--set vqa.task=gqa` runs the shapes world's GQA questions.

Recipe: setup (config, backbone, data) -> the shared connector alignment (once per backbone, data
and settings, cached: the stand-in for CLIP-ViL's pre-trained connector) -> the method (one engine
loop) -> evaluate -> export; the outputs (results.json, efficiency, card, summary with the time
breakdown) come from the kit. `--compare a,b,mdpd:norms_all+ckpt` runs each method on identical
data, seeds and alignment and writes one table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mdpd_vl.atomic import check_paths
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.engine.config import TrainConfig, dump_config, parse_name_list
from mdpd_vl.engine.train import train
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.tasks import common, kit
from mdpd_vl.tasks import vqa_eval as ev
from mdpd_vl.tasks import vqa_setup as setup
from mdpd_vl.tasks.vqa_model import VQAConfig, VQAModel, build_vqa_model
from mdpd_vl.tuning.config import MethodConfig
from mdpd_vl.tuning.objective import describe_objective

DATASETS = ("shapes", "vqav2", "gqa")
# What each dataset changes from the defaults when no --config is given (configs/vqa/ spell it out).
# Real data: CLIP-ViL's image tower (RN50x4, OpenAI weights; the encoder defaults to bert-base-uncased)
# and schedule (Paranioar/UniPT CLIP-ViL/scripts/train_side_{vqa,gqa}.sh: batch 32 x 8 accumulated,
# 5 epochs, warm-up 5% then linear decay as BertAdam's warmup_linear and the paper's Table A), the
# backbone's own image size, no in-memory caches.
_REAL = ["backbone=RN50x4", "pretrained=openai", "data.image_size=null", "data.cache_grids=false",
         "data.cache_features=false", "train.batch_size=32", "train.grad_accum=8", "train.epochs=5",
         "train.schedule=linear", "align.epochs=1", "align.batch_size=32"]
DATASET_PRESETS: dict[str, list[str]] = {
    "shapes": [],
    "vqav2": [*_REAL, "vqa.task=vqa", "train.lr=5e-4", "data.eval_split=val"],
    "gqa": [*_REAL, "vqa.task=gqa", "train.lr=1e-4", "data.train_splits=[train,val]", "data.eval_split=testdev"],
}


@dataclass
class DataConfig:
    """Where the questions are, which splits train and evaluate, and how they are fed."""

    dataset: str = field(default="shapes", metadata={"help": "shapes | vqav2 | gqa"})
    root: str | None = field(default=None, metadata={"help": "data root; null = $MDPD_DATA or ./data"})
    train_splits: list[str] = field(
        default_factory=lambda: ["train"],
        metadata={"help": "splits to train on (vqav2: train, nominival = val minus LXMERT's minival; gqa: train, val)"})
    eval_split: str | None = field(
        default=None, metadata={"help": "split to evaluate (vqav2: val | minival; gqa: testdev); null = val for "
                                        "VQA questions, testdev for GQA questions"})
    predict_split: str | None = field(
        default=None, metadata={"help": "also write the results file of this split (vqav2: test-dev, test)"})
    minival_file: str | None = field(
        default=None, metadata={"help": "LXMERT's data/vqa/minival.json (question ids) for minival / nominival"})
    vocab: str = field(
        default="auto", metadata={"help": "answer vocabulary: auto (CLIP-ViL's 3,129 VQAv2 / 1,842 GQA answers for "
                                          "real data, the training answers for shapes) or a JSON file"})
    image_size: int | None = field(default=128, metadata={"help": "input side in pixels; null = backbone's own"})
    max_question_len: int = field(default=20, metadata={"help": "question tokens kept ([CLS], [SEP] included)"})
    shapes_scale: str = field(default="default", metadata={"help": "shapes world size: tiny | default | large"})
    shapes_seed: int = field(default=0, metadata={"help": "seed of the shapes world"})
    max_train_questions: int | None = field(default=None, metadata={"help": "train on the first N questions only"})
    cache_grids: bool = field(
        default=True, metadata={"help": "keep the frozen image backbone's grid tokens of every training image in "
                                        "memory (exact for every method here)"})
    cache_features: bool = field(
        default=True, metadata={"help": "cache the frozen encoder's per-layer features where exact (linear, "
                                        "side-kept methods, mdpd head)"})
    cache_dir: str | None = field(default=None, metadata={"help": "null = $MDPD_CACHE or <root>/cache"})
    eval_batch_size: int = field(default=64, metadata={"help": "questions per batch when answering"})
    timed_batch: int = field(default=32, metadata={"help": "questions per batch of the latency measurement"})


@dataclass
class AlignConfig:
    """The shared stage that trains the connector through the frozen encoder before any method."""

    epochs: int = field(default=4, metadata={"help": "passes over the training questions"})
    batch_size: int = field(default=64, metadata={"help": "questions per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (warm-up 5%, cosine)"})


@dataclass
class VQARunConfig:
    """Everything one VQA run needs; `python -m mdpd_vl.tasks.vqa --help` lists the flags."""

    backbone: str = field(default="offline", metadata={"help": "image backbone: offline | <open_clip name>"})
    text_backbone: str | None = field(
        default=None, metadata={"help": "BERT-class encoder (transformers name or folder); null = MiniLM offline, "
                                        "bert-base-uncased otherwise"})
    pretrained: str | None = field(default=None, metadata={"help": "open_clip pretrained tag or checkpoint path"})
    max_grid: int | None = field(
        default=None, metadata={"help": "grid positions per axis of the connector; null = the probe grid "
                                        "(CLIP-ViL: 25)"})
    output_dir: str = field(default="runs/vqa", metadata={"help": "run folder (results, checkpoints, export)"})
    data: DataConfig = field(default_factory=DataConfig)
    vqa: VQAConfig = field(default_factory=VQAConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    # MDPD tunes the answer head of the backbone path only by default: no backward through the
    # encoder, its features cacheable (tasks/vqa.md measures norms_all + checkpointing beside it)
    method: MethodConfig = field(default_factory=lambda: MethodConfig(distill=DistillConfig(backbone_trainable="head")))
    # 6 epochs keep the embedded default within its CPU budget (tasks/vqa.md has the measured breakdown)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=64, lr=1e-3, warmup_ratio=0.05, schedule="cosine",
                                            log_every=10, ckpt_every=0))
    group_lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "learning rate per parameter group suffix, e.g. backbone_norms: 1e-4"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.tasks.vqa", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--text-backbone")
    p.add_argument("--predict", metavar="SPLIT", help="also write the results file of SPLIT (vqav2: test-dev)")
    p.add_argument("--score", metavar="FILE", help="score a results file on the eval split and exit (no training)")
    kit.add_arguments(p, "mdpd | unipt | sherl | lst | lora | adapter | bitfit | partial | linear | full; "
                         "--compare also takes mdpd:<head|norms_last_k|norms_all>[+ckpt]")
    return p.parse_args(argv)


FLAGS = {**kit.COMMON_FLAGS, "dataset": "data.dataset", "data_root": "data.root", "text_backbone": "text_backbone",
         "predict": "data.predict_split"}


def resolve_config(args: argparse.Namespace) -> VQARunConfig:
    """Defaults < dataset preset < --config file < flags < --set overrides; errors name the option."""
    return kit.resolve_config(VQARunConfig, args, FLAGS, DATASET_PRESETS.get(args.dataset or "shapes", []))


# ----------------------------------------------------------------------------- one method
def build_model(cfg: VQARunConfig, backbone: Any, answers: list[str]) -> VQAModel:
    """The method on the (aligned) cross-modal backbone, with answer heads."""
    return build_vqa_model(backbone, cfg.method, answers, cfg.vqa)


def objective(cfg: VQARunConfig) -> str:
    """What the run optimises, in words: `describe_objective` with VQA's task loss and, for MDPD, the
    answer distillation `VQAModel.losses` computes (DualPath's own logits term is off there)."""
    v, method = cfg.vqa, copy.deepcopy(cfg.method)
    if method.name == "mdpd":
        method.distill.logits = "none"  # build_vqa_model turns it off; vqa.logits names the real term
    loss = ("LXMERT's BCE against the VQA soft scores (summed over the answers)" if v.task == "vqa" else
            "cross-entropy on the single GQA answer" if v.gqa_loss == "ce" else "BCE against the one-hot GQA answer")
    answer_kd = {"kl": f"the KL of the answer distributions (temperature {v.temperature:g}, weight {v.weight:g})",
                 "mse": f"the answer-logits MSE of paper eq. 3 (weight {v.weight:g}, sum-reduced)"}.get(v.logits)
    return describe_objective(method, {"task_loss": loss, "backbone_task": v.backbone_task,
                                       "answer_distillation": answer_kd})


def _groups(model: torch.nn.Module, cfg: VQARunConfig) -> list[dict[str, Any]]:
    out = []
    for name, params in model.param_groups().items():
        if params:
            lr = next((float(v) for k, v in cfg.group_lr.items() if name.endswith(k)), None)
            out.append({"name": name, "params": params, **({"lr": lr} if lr is not None else {})})
    return out


def run(cfg: VQARunConfig, command: str, output_dir: Path | None = None,
        memo: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Align (or reuse the aligned connector), train, evaluate, export one method; returns the results
    dict (also written to results.json). `memo` carries what methods of one --compare share.
    Several processes: the main one aligns (the others load its connector), all train, the main one
    alone evaluates, times, exports and writes (kit)."""
    timings, memo = kit.Timings(), memo if memo is not None else {}
    common.seed_everything(cfg.train.seed)
    with timings.phase("backbones + method"):
        task = setup.check(cfg)
        backbone = setup.build_backbone(cfg)
    with timings.phase("data: shapes world / indexes"):
        data = setup.RunData.load(cfg, task, backbone, memo)
    out = kit.output_dir(output_dir or cfg.output_dir)
    with timings.phase("data: image grids"):
        data.prepare_grids(cfg, backbone, memo)
    # trained by the main process alone and cached (the others load it); the method's initialisation
    # then draws the same numbers whether the alignment ran or was loaded (fork_rng)
    with timings.phase("connector alignment (shared)"), kit.main_first(), torch.random.fork_rng():
        alignment = setup.align(cfg, backbone, data)
    with timings.phase("backbones + method"):
        model = build_model(cfg, backbone, data.answers)
    frozen = setup.encoder_frozen(cfg)
    with timings.phase("data: feature cache" if frozen and cfg.data.cache_features else "data"):
        train_set, collate, cached = data.training_inputs(cfg, model.backbone, frozen)
        evals = kit.on_main(data.eval_inputs, model.backbone, frozen)
    kit.show(f"vqa: {cfg.method.name} on {cfg.data.dataset} ({task} questions: {len(train_set)} train, "
             f"{len(data.eval.items)} {data.eval.name}), {len(data.answers)} answers, backbone {cfg.backbone}"
             f"{', cached encoder features' if cached else ''}")

    def step_fn(m: VQAModel, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        losses = m.losses(batch)
        return {"loss": sum(losses.values()), **losses}

    with timings.phase("training"):
        t0 = time.perf_counter()
        result = train(model, step_fn, train_set, collate, _groups(model, cfg), cfg.train, out / "train",
                       resume="auto", config=dump_config(cfg))
        train_seconds = time.perf_counter() - t0
    return kit.on_main(_finish, cfg, command, task, backbone, data, model, evals, out, result, train_seconds,
                       cached, alignment, timings)


def _finish(cfg: VQARunConfig, command: str, task: str, backbone: Any, data: setup.RunData, model: VQAModel,
            evals: Any, out: Path, result: Any, train_seconds: float, cached: bool, alignment: dict[str, Any],
            timings: kit.Timings) -> dict[str, Any]:
    """After training, on the main process: evaluate, export, measure, write results.json + card, summary."""
    with timings.phase("evaluation"):
        deployed = model.answerer(preprocess=data.preprocess(cfg, backbone))
        metrics = ev.evaluate(deployed, evals, task, out / f"predictions_{data.eval.name}.json")
        side = ev.evaluate(model.answerer(True, deployed.preprocess), evals, task,
                           out / f"predictions_{data.eval.name}_side_kept.json") if model.is_mdpd else None
        predicted = data.predict(cfg, deployed, task, out)
    with timings.phase("export"):
        export_dir = kit.export(deployed, out / "export")
    with timings.phase("efficiency: memory + latency"):
        efficiency = ev.efficiency(model, deployed, data.eval, train_batch=cfg.train.batch_size,
                                   timed_batch=cfg.data.timed_batch)
    results = kit.results(
        task="vqa", dataset=cfg.data.dataset, split=data.eval.name, method=cfg.method.name, backbone=cfg.backbone,
        metrics=metrics, metrics_side_kept=side, metrics_before_training=None, efficiency=efficiency,
        train_seconds=train_seconds, timings=timings, command=command, config=dump_config(cfg), train_result=result,
        objective=objective(cfg), question_set=task, train_steps=result.step, cached_features=cached,
        majority_baseline=data.majority,
        alignment=alignment, num_answers=len(data.answers), counts=data.counts(),
        predictions={"eval": str(out / f"predictions_{data.eval.name}.json"), "predict": predicted},
        export_dir=str(export_dir) if export_dir else None,
        feature_cache=str(data.cache_dir) if data.cache_dir else None)
    kit.write_results(out, results)
    card = ev.write_card(out, results, data.eval)
    kit.show(kit.summary(results, ev.metrics_table(results), kit.locations(out, export_dir, card, data.cache_dir)))
    return results


# ----------------------------------------------------------------------------- the command line
def score_only(cfg: VQARunConfig, path: str) -> int:
    """`--score FILE`: the official accuracy of a results file on the eval split, nothing trained."""
    task = setup.check(cfg)
    split = setup.eval_split_only(cfg, task)
    metrics = ev.score_file(task, split, path)
    kit.show(json.dumps({k: v for k, v in metrics.items() if not k.startswith("per_")}, indent=2))
    return 0


def compare(cfg: VQARunConfig, entries: str, command: str) -> int:
    """One run per `--compare` entry on identical data, seeds and aligned connector; one table."""
    methods = parse_name_list(entries, "--compare", lambda e: (e, kit.compare_entry(cfg.method, e)))
    kit.keep_freed_memory()  # as kit.main does for every CLI run
    memo: dict[str, Any] = {}
    runs = []
    for label, method in methods:
        one = copy.deepcopy(cfg)
        one.method = copy.deepcopy(method)
        runs.append(run(one, command, Path(cfg.output_dir) / kit.compare_folder(label), memo))
    labels = [label for label, _ in methods]
    kit.show(kit.on_main(lambda: kit.write_comparison(  # the main process alone holds the runs
        Path(cfg.output_dir), runs, command, "accuracy", "accuracy", labels=labels, columns=setup.compare_columns,
        notes=setup.gains_table(runs, labels))) or "")
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = resolve_config(args)
    command = common.command_line(argv, "mdpd_vl.tasks.vqa")
    try:
        if args.score:
            return score_only(cfg, args.score)
        if args.print_config or not args.compare:
            return kit.main(args, cfg, run, module="mdpd_vl.tasks.vqa", flags=FLAGS, argv=argv,
                            in_dirs={"--data-root": common.data_root(cfg.data.root)}, metric=("accuracy", "accuracy"))
        check_paths(out_dirs={"--output-dir": cfg.output_dir}, in_dirs={"--data-root": common.data_root(cfg.data.root)})
        return compare(cfg, args.compare, command)
    except UserError as err:  # said in the user's words: the option they typed, not a config key
        raise common.relabel(err, kit.user_labels(args, FLAGS)) from None


if __name__ == "__main__":
    raise SystemExit(main())
