"""What only VQA needs after training: official accuracy through prediction files, the majority
baseline, the efficiency batch (memory + latency), and VQA's tables and card words.

Every accuracy goes through the official file format: the answers are written as the evaluation
server's results file (VQAv2 `[{"question_id", "answer"}]`, GQA `[{"questionId", "prediction"}]`),
read back with the checked reader and scored by `mdpd_vl.eval.vqa` / `mdpd_vl.eval.gqa`, so what
the run reports is what the file scores. Everything task-independent is in `mdpd_vl.tasks.kit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdpd_vl.cards import markdown_table
from mdpd_vl.deploy.vqa import VisualQuestionAnswerer, run_batches
from mdpd_vl.errors import UserError
from mdpd_vl.eval import gqa as gqa_eval
from mdpd_vl.eval import vqa as vqa_eval
from mdpd_vl.tasks import kit
from mdpd_vl.tasks.vqa_data import EvalInputs, QuestionSplit, annotations
from mdpd_vl.tasks.vqa_model import VQAModel

ANSWER_TYPES = ("yes/no", "number", "other")
FORMAT = {"vqa": vqa_eval, "gqa": gqa_eval}  # results-file writer / reader of each task


# ----------------------------------------------------------------------------- accuracy
def score(task: str, split: QuestionSplit, predictions: dict[str, str], where: str = "predictions") -> dict[str, Any]:
    """Official accuracy of `{str(question id): answer}` on `split`: `accuracy` (the headline), then
    VQAv2's per-answer-type accuracy (yes/no, number, other) or GQA's binary / open."""
    try:
        if task == "vqa":
            m = vqa_eval.vqa_accuracy(predictions, annotations(split))
            per = m["per_answer_type"]
            return {"accuracy": m["overall"], **{t: per.get(t) for t in ANSWER_TYPES},
                    "num_questions": m["num_questions"], "per_question_type": m["per_question_type"]}
        m = gqa_eval.gqa_accuracy(predictions, gqa_eval.questions_from_index(split.items))
    except UserError as err:  # name the file the answers came from
        message = str(err).split(": ", 1)[-1] if err.where else str(err)
        raise UserError(message, where=where, field=err.field) from None
    return {"accuracy": round(m["accuracy"], 2), "binary": _round(m["binary"]), "open": _round(m["open"]),
            "num_questions": m["num_questions"], "per_structural": m["per_structural"]}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def write_predictions(task: str, path: Path, split: QuestionSplit, answers: Sequence[str]) -> Path:
    """The results file of `split` in the task's official format (atomic)."""
    FORMAT[task].write_predictions(path, split.question_ids, list(answers))
    return path


def score_file(task: str, split: QuestionSplit, path: str | Path) -> dict[str, Any]:
    """Official accuracy of a results file; a malformed entry, a repeated or unknown id is one line."""
    return score(task, split, FORMAT[task].read_predictions(path), str(path))


def evaluate(answerer: VisualQuestionAnswerer, inputs: EvalInputs, task: str, out: Path) -> dict[str, Any]:
    """Answer the eval split (precomputed inputs in the answerer's batches), write the results file
    `out`, read it back and score it."""
    answers = answerer.answers_of(run_batches(answerer.model, inputs.batches()))
    write_predictions(task, out, inputs.split, answers)
    return score_file(task, inputs.split, out)


def majority_baseline(task: str, split: QuestionSplit, answer: str) -> dict[str, Any]:
    """The accuracy of answering every question with the most frequent training answer."""
    return {"answer": answer, **score(task, split, {str(q): answer for q in split.question_ids})}


def predict(answerer: VisualQuestionAnswerer, split: QuestionSplit, task: str, out: Path) -> Path:
    """Answer every question of `split` from its image files and write the results file (the
    evaluation server's input for test-dev / test)."""
    return write_predictions(task, out, split, answerer.answer(split.image_paths, split.questions))


# ----------------------------------------------------------------------------- efficiency
def efficiency(model: VQAModel, deployed: VisualQuestionAnswerer, split: QuestionSplit, *, train_batch: int,
               timed_batch: int, rounds: int = 3) -> dict[str, Any]:
    """The kit's efficiency block: the memory of one live training step on `train_batch` eval-split
    questions (images decoded and encoded, as training without a cache runs), and the latency of the
    deployed, bare and side-kept models on `timed_batch` of them, timed interleaved."""
    n = min(train_batch, len(split.items))
    x = next(deployed.input_batches(split.image_paths[:n], split.questions[:n], n))
    batch: dict[str, Any] = {"inputs": x, **_targets(model, split, n)}
    params = [p for group in model.param_groups().values() for p in group]
    m = min(timed_batch, n)
    timed_x = {k: v[:m] for k, v in x.items()}

    def closure() -> torch.Tensor:
        return sum(model.losses(batch).values())

    def call(module: nn.Module) -> Any:
        module.eval()
        return lambda: module(timed_x)

    side = model.deployed(side_kept=True) if model.is_mdpd else None
    timed = {"deployed": call(deployed.model), "bare": call(model.backbone),  # forward = per-layer features
             "side_kept": call(side) if side is not None else None}
    step = kit.TrainStep(model, closure, params, x, n)
    eff = kit.efficiency(step, timed, m, rounds=rounds, trainable_params=model.tuned.trainable_params,
                         inference_params=model.tuned.inference_params,
                         inference_params_side_kept=_count(side) if side is not None else None)
    for key in ("", "_bare", "_side_kept"):
        qps = eff.get(f"infer_qps{key}")
        eff[f"latency_ms{key}"] = round(1000 * m / qps, 2) if qps else None
    return eff


def _targets(model: VQAModel, split: QuestionSplit, n: int) -> dict[str, torch.Tensor]:
    from mdpd_vl.data.datasets import soft_target

    vocab = {a: i for i, a in enumerate(model.answers)}
    items = split.items[:n]
    if model.cfg.task == "vqa":
        return {"target": torch.stack([soft_target(it["answers"], vocab) for it in items])}
    return {"label": torch.tensor([vocab.get(it["answer"], -1) for it in items])}


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- VQA's tables and card
def metrics_table(results: dict[str, Any]) -> str:
    """Accuracy (overall + per answer type, or GQA binary / open), parameters, latency and QPS per
    deployment, the bare backbone's latency, and the majority-answer baseline."""
    eff, gqa = results["efficiency"], results["config"]["vqa"]["task"] == "gqa"
    parts = ("binary", "open") if gqa else ANSWER_TYPES
    deployments = [("faded (deployed)" if results["method"] == "mdpd" else "deployed", results["metrics"],
                    eff["inference_params"], eff["latency_ms"], eff["infer_qps"])]
    if results.get("metrics_side_kept"):
        deployments.append(("side kept", results["metrics_side_kept"], eff["inference_params_side_kept"],
                            eff["latency_ms_side_kept"], eff["infer_qps_side_kept"]))
    base = results["majority_baseline"]
    deployments.append((f"majority answer ({base['answer']!r})", base, None, None, None))
    rows = []
    for name, m, params, ms, qps in deployments:
        row = {"model": name, "accuracy": m["accuracy"], **{p: m.get(p) if m.get(p) is not None else "-" for p in parts}}
        row.update({"infer params (M)": round(params / 1e6, 2) if params else "-", "ms / batch": ms or "-",
                    "QPS": qps or "-"})
        rows.append(row)
    rows.append({"model": "bare backbone (reference)", "ms / batch": eff.get("latency_ms_bare") or "-",
                 "QPS": eff.get("infer_qps_bare") or "-"})
    counts = results["counts"]
    note = (f"{results['metrics']['num_questions']} questions of `{results['split']}`; latency of a batch of "
            f"{eff['timed_items']} questions (images decoded by the caller). Skipped: "
            f"{counts['eval']['missing_images']} missing / {counts['eval']['unreadable_images']} unreadable images; "
            f"{counts['eval']['oov_answers']} answers outside the {results['num_answers']}-answer vocabulary "
            "(they score zero).")
    return markdown_table(rows) + "\n\n" + note


def use_snippet(export_dir: Path | None, split: QuestionSplit) -> str:
    """The card's "Use" code: reload the export and answer two eval-split questions from their files."""
    if export_dir is None:
        return ("# not exported: this method's deployed model is not a plain backbone + head\n"
                "# (side-kept networks and unmergeable adapters change the backbone)")
    images = [kit.shown_path(p) for p in split.image_paths[:2]]
    return (f"from mdpd_vl.export import load_exported\n\n"
            f"model = load_exported({kit.shown_path(export_dir)!r})  # backbone + answer head, preprocessing, answers\n"
            f"print(model.answer({images!r},  # PIL images or files\n"
            f"                   {split.questions[:2]!r}))")


def write_card(out: Path, results: dict[str, Any], split: QuestionSplit) -> Path:
    """MODEL_CARD.md of a VQA run."""
    export_dir = Path(results["export_dir"]) if results["export_dir"] else None
    data = results["config"]["data"]
    return kit.write_card(
        out, results, title=f"VQA {results['method']} on {results['dataset']}", task_words="visual question answering",
        deployed_summary="image backbone + connector + cross-modal encoder + answer head, with the image "
                         "preprocessing, tokenizer, question length and answer vocabulary it was evaluated with; "
                         "no side network.",
        objective=results["objective"], metrics_table=metrics_table(results), use_snippet=use_snippet(export_dir, split),
        data=f"{results['dataset']} ({results['config']['vqa']['task']} questions), trained on "
             f"{', '.join(f'`{s}`' for s in data['train_splits'])}; {results['num_answers']} answers.")


__all__ = ["efficiency", "evaluate", "majority_baseline", "metrics_table", "predict", "score",
           "score_file", "use_snippet", "write_card", "write_predictions"]
