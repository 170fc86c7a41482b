"""GQA accuracy as the official GQA `eval.py` computes it (mirrored in MILVLG/openvqa
openvqa/datasets/gqa/eval/gqa_eval.py).

Raw exact string match `prediction == answer`, no normalisation of either side, averaged over the
questions with `isBalanced`; "open" questions are those whose `types.structural` is "query", every
other structural type is "binary". Percentages, unrounded (the official script prints `.2f`).
Validity/plausibility (need the choices file), consistency (needs the all-questions file) and the
distribution score are not computed here. Deviation: predictions for question ids that the questions
file does not hold are an error here (the official script ignores them), so a wrong split or file is
caught; `allow_unknown=True` restores the official behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from mdpd_vl.errors import UserError


def _field(qid: str, record: Mapping[str, Any], *path: str) -> Any:
    node: Any = record
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise UserError(f"question {qid} has no '{'.'.join(path)}'", where="questions",
                            field=".".join(path))
        node = node[key]
    return node


def _pct(values: list[float]) -> float | None:
    return 100.0 * float(sum(values)) / len(values) if values else None


def gqa_accuracy(predictions: Mapping[Any, str], questions: Mapping[Any, Mapping[str, Any]],
                 allow_unknown: bool = False) -> dict[str, Any]:
    """Official GQA accuracy over balanced questions: `accuracy`, `binary`, `open` (percent; None
    when a group is empty), `per_structural`, `per_semantic`, `num_questions`.

    `questions` is the balanced questions JSON (questionId -> record); `predictions` maps
    questionId -> answer string and must cover every balanced question. A prediction for a question
    that is not in `questions` at all is an error (a wrong file or split), unless `allow_unknown`
    (the official script ignores them).
    """
    preds = {str(k): v for k, v in predictions.items()}
    scores: list[float] = []
    groups: dict[str, list[float]] = {"binary": [], "open": []}
    structural: dict[str, list[float]] = {}
    semantic: dict[str, list[float]] = {}
    missing: list[str] = []
    for raw_qid, q in questions.items():
        qid = str(raw_qid)
        if not isinstance(q, Mapping):
            raise UserError(f"question {qid} is not an object", where="questions")
        if not _field(qid, q, "isBalanced"):
            continue
        if qid not in preds:
            missing.append(qid)
            continue
        pred = preds[qid]
        if not isinstance(pred, str):
            raise UserError(f"the prediction for question {qid} is {type(pred).__name__}, not a string",
                            where="predictions", field="prediction")
        gold = _field(qid, q, "answer")
        s_type = _field(qid, q, "types", "structural")
        score = 1.0 if pred == gold else 0.0
        scores.append(score)
        groups["open" if s_type == "query" else "binary"].append(score)
        structural.setdefault(s_type, []).append(score)
        semantic.setdefault(_field(qid, q, "types", "semantic"), []).append(score)
    if missing:
        raise UserError(f"no prediction for {len(missing)} balanced questions (e.g. questionId "
                        f"{missing[0]}); the official evaluation needs all of them", where="predictions")
    known = {str(k) for k in questions}
    unknown = [k for k in preds if k not in known]
    if unknown and not allow_unknown:
        raise UserError(f"{len(unknown)} predictions are for questions not in the questions file (e.g. "
                        f"questionId {unknown[0]})", where="predictions", field="questionId")
    if not scores:
        raise UserError("no question has isBalanced = true", where="questions")
    return {
        "accuracy": _pct(scores), "binary": _pct(groups["binary"]), "open": _pct(groups["open"]),
        "per_structural": {k: _pct(v) for k, v in sorted(structural.items())},
        "per_semantic": {k: _pct(v) for k, v in sorted(semantic.items())},
        "num_questions": len(scores),
    }


def questions_from_index(items: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Turn canonical `gqa` index items into records shaped like the balanced questions JSON."""
    out: dict[str, dict[str, Any]] = {}
    for i, item in enumerate(items):
        for key in ("question_id", "answer", "structural", "semantic", "is_balanced"):
            if key not in item:
                raise UserError(f"item {i} has no '{key}'", where="index", field=key)
        out[str(item["question_id"])] = {
            "answer": item["answer"], "isBalanced": item["is_balanced"],
            "types": {"structural": item["structural"], "semantic": item["semantic"]},
        }
    return out


# -- prediction files: `[{"questionId", "prediction"}]`, the GQA submission format ---------------------
ID_KEY, ANSWER_KEY = "questionId", "prediction"


def prediction_records(question_ids: Sequence[Any], answers: Sequence[str]) -> list[dict[str, Any]]:
    """`[{"questionId", "prediction"}]` in the given order; ids must be unique (checked)."""
    from mdpd_vl.eval.vqa import prediction_map

    if len(question_ids) != len(answers):
        raise ValueError(f"{len(question_ids)} question ids but {len(answers)} answers")
    records = [{ID_KEY: str(q), ANSWER_KEY: str(a)} for q, a in zip(question_ids, answers)]
    prediction_map(records, ID_KEY, ANSWER_KEY, "predictions")
    return records


def write_predictions(path: Any, question_ids: Sequence[Any], answers: Sequence[str]) -> None:
    """Write the GQA predictions JSON (atomically, never half-written)."""
    import json

    from mdpd_vl.engine.config import atomic_write_text

    atomic_write_text(path, json.dumps(prediction_records(question_ids, answers)) + "\n")


def read_predictions(path: Any) -> dict[str, str]:
    """A predictions JSON `[{questionId, prediction}]` as `{questionId: prediction}` (an entry
    without both fields, a non-string prediction or a repeated id is a one-line UserError)."""
    from mdpd_vl.eval.report import load_json
    from mdpd_vl.eval.vqa import prediction_map

    return prediction_map(load_json(path), ID_KEY, ANSWER_KEY, str(path))
