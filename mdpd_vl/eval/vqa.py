"""VQA accuracy exactly as the official evaluation computes it.

Reference: GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py (current master).
Per question, for each of the ten human answers: acc_i = min(1, #{other answers == prediction} / 3),
averaged over the ten leave-one-out subsets ("other" = a different answer *record*, so answer_id
keeps duplicates apart). Newlines/tabs become spaces and both sides are stripped; punctuation,
number words, articles and contractions are normalised on both sides ONLY when the ten answers
are not all identical. Reported as round(100 * mean, 2), overall and per answer / question type.
The regular expressions, including the period pattern whose "lookbehind" is really a lookahead,
and the constant tables below are reproduced as the official code has them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mdpd_vl.errors import UserError

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # Sic: the official table maps "somebody'd" to "somebodyd"; kept so scores match.
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
# Verbatim from the official code: "(?!<=\d)" is a negative *lookahead* for "<=" + digit, so in
# effect every period not followed by a digit is removed: "2.5" and ".5" keep it, "1." loses it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official call is `periodStrip.sub("", text, re.UNICODE)`: the flag lands in the *count*
# argument, so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: drop or space out punctuation, strip periods."""
    out = text
    # The official test reads the *input* text for every mark, not the partly cleaned output.
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, drop articles,
    restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


@functools.lru_cache(maxsize=1 << 16)
def normalize_answer(text: str) -> str:
    """Both official normalisation steps (used only when the human answers disagree)."""
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _record_key(record: Mapping[str, Any], answer: str) -> tuple:
    """Hashable identity of an answer record (the official code removes 'self' by dict equality)."""
    return tuple(sorted((k, repr(v)) for k, v in record.items() if k != "answer")) + (answer,)


def question_accuracy(prediction: str, answers: Sequence[Mapping[str, Any]]) -> float:
    """Official accuracy in [0, 1] of one predicted answer against the human answer records."""
    gts = [_clean(a["answer"]) for a in answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [normalize_answer(g) for g in gts]
        pred = normalize_answer(pred)
    keys = [_record_key(a, g) for a, g in zip(answers, gts)]
    matches = sum(g == pred for g in gts)
    multiplicity: dict[tuple, int] = {}
    for k in keys:
        multiplicity[k] = multiplicity.get(k, 0) + 1
    # Leave-one-out: dropping record i drops every record equal to it (all of them, if duplicated).
    accs = [min(1, float(matches - (multiplicity[k] if g == pred else 0)) / 3)
            for k, g in zip(keys, gts)]
    return float(sum(accs)) / len(accs)


def _check_annotation(i: int, ann: Any) -> None:
    if not isinstance(ann, Mapping):
        raise UserError(f"annotation {i} is not an object", where="annotations")
    for field in ("question_id", "answers", "question_type", "answer_type"):
        if field not in ann:
            raise UserError(f"annotation {i} has no '{field}'", where="annotations", field=field)
    answers = ann["answers"]
    if not isinstance(answers, list) or not answers:
        raise UserError(f"annotation {i} (question {ann['question_id']}) has no answer list",
                        where="annotations", field="answers")
    for a in answers:
        if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
            raise UserError(f"annotation {i} (question {ann['question_id']}): every answer must be "
                            "an object with a string 'answer'", where="annotations", field="answers")


def _match_predictions(predictions: Mapping[Any, Any], qids: list[Any]) -> dict[str, str]:
    """Predictions keyed by str(question_id); the id sets must be equal, as `VQA.loadRes` asserts."""
    preds = {str(k): v for k, v in predictions.items()}
    wanted = {str(q) for q in qids}
    missing = [q for q in qids if str(q) not in preds]
    if missing:
        raise UserError(f"no prediction for {len(missing)} of {len(qids)} questions "
                        f"(e.g. question_id {missing[0]})", where="predictions")
    extra = [k for k in preds if k not in wanted]
    if extra:
        raise UserError(f"{len(extra)} predictions are for questions not in the annotations "
                        f"(e.g. question_id {extra[0]})", where="predictions")
    for k, v in preds.items():
        if not isinstance(v, str):
            raise UserError(f"the answer for question_id {k} is {type(v).__name__}, not a string",
                            where="predictions", field="answer")
    return preds


def vqa_accuracy(predictions: Mapping[Any, str], annotations: Sequence[Mapping[str, Any]],
                 digits: int = 2) -> dict[str, Any]:
    """Official VQA accuracy: `overall`, `per_answer_type`, `per_question_type` (percent, rounded to
    `digits`), plus `num_questions`. `annotations` is the official `annotations` list."""
    if not annotations:
        raise UserError("no annotations", where="annotations")
    for i, ann in enumerate(annotations):
        _check_annotation(i, ann)
    qids = [ann["question_id"] for ann in annotations]
    seen: set[str] = set()
    for q in qids:
        if str(q) in seen:
            raise UserError(f"question_id {q} appears twice", where="annotations", field="question_id")
        seen.add(str(q))
    preds = _match_predictions(predictions, qids)

    scores: list[float] = []
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for ann in annotations:
        acc = question_accuracy(preds[str(ann["question_id"])], ann["answers"])
        scores.append(acc)
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)

    def pct(values: list[float]) -> float:
        # Same expression order as the official setAccuracy, so rounding ties agree.
        return round(100 * float(sum(values)) / len(values), digits)

    return {
        "overall": pct(scores),
        "per_answer_type": {k: pct(v) for k, v in by_atype.items()},
        "per_question_type": {k: pct(v) for k, v in by_qtype.items()},
        "num_questions": len(scores),
    }


# -- prediction files: `[{"question_id", "answer"}]`, the evaluation server's results format ----------
ID_KEY, ANSWER_KEY = "question_id", "answer"


def prediction_map(records: Any, id_key: str, value_key: str, where: str = "predictions") -> dict[str, str]:
    """`{str(id): answer}` from a list of prediction objects; a non-list, an entry without the two
    fields, a non-string answer or an id given twice is a one-line UserError naming `where`."""
    if not isinstance(records, list):
        raise UserError(f"expected a list of {{{id_key}, {value_key}}} objects", where=where)
    out: dict[str, str] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or id_key not in rec or value_key not in rec:
            raise UserError(f"entry {i} is not an object with '{id_key}' and '{value_key}'", where=where,
                            field=id_key)
        key = str(rec[id_key])
        if key in out:
            raise UserError(f"{id_key} {rec[id_key]} appears twice", where=where, field=id_key)
        if not isinstance(rec[value_key], str):
            raise UserError(f"the {value_key} for {id_key} {key} is {type(rec[value_key]).__name__}, not a string",
                            where=where, field=value_key)
        out[key] = rec[value_key]
    return out


def prediction_records(question_ids: Sequence[Any], answers: Sequence[str]) -> list[dict[str, Any]]:
    """`[{"question_id", "answer"}]` in the given order; ids must be unique (checked)."""
    if len(question_ids) != len(answers):
        raise ValueError(f"{len(question_ids)} question ids but {len(answers)} answers")
    records = [{ID_KEY: q, ANSWER_KEY: str(a)} for q, a in zip(question_ids, answers)]
    prediction_map(records, ID_KEY, ANSWER_KEY, "predictions")
    return records


def write_predictions(path: Any, question_ids: Sequence[Any], answers: Sequence[str]) -> None:
    """Write the results JSON for the VQA evaluation server (atomically, never half-written)."""
    import json

    from mdpd_vl.engine.config import atomic_write_text

    atomic_write_text(path, json.dumps(prediction_records(question_ids, answers)) + "\n")


def read_predictions(path: Any) -> dict[str, str]:
    """A results JSON `[{question_id, answer}]` as `{str(question_id): answer}` (checked as above)."""
    from mdpd_vl.eval.report import load_json

    return prediction_map(load_json(path), ID_KEY, ANSWER_KEY, str(path))
