"""VQAv2: the official questions and annotations JSON, plus an answer vocabulary with soft scores.

Layout (`--raw DIR`): `v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json`
and `v2_mscoco_{train2014,val2014}_annotations.json` in `DIR/` (or `questions/`, `annotations/`);
COCO images `DIR/[images/]{train2014,val2014,test2015}/COCO_<folder>_<12-digit id>.jpg`.
Splits: train, val, test-dev, test (the test ones have no answers); by default every split whose
questions file is present.

Soft scores: the answers of the ten annotators are normalised as the official evaluation does
(punctuation, number words, articles, contractions) and an answer given by m of n annotators scores
the official leave-one-out accuracy, 0.3 / 0.6 / 0.9 / 1.0 for m = 1 / 2 / 3 / >= 4 of 10 (LXMERT's
labels). Only answers in the vocabulary are kept in `answers`; `raw_answers` keeps all ten. The
vocabulary is an existing `trainval_ans2label.json` (`vocab`) or every normalised
`multiple_choice_answer` seen in at least `min_count` annotated questions; it is written as
`<out>/ans2label.json` together with the indexes (not when only test splits are prepared without one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdpd_vl.data.prep.common import (
    DatasetInfo,
    PrepReport,
    PrepRun,
    SplitIndex,
    expect,
    find_input,
    parse_options,
    read_json,
)
from mdpd_vl.data.prep.media import check_image
from mdpd_vl.errors import UserError

CODE_VERSION = 1
VOCAB_FILE = "ans2label.json"
INFO = DatasetInfo("vqav2", {"train": 443757, "val": 214354, "test-dev": 107394, "test": 447793}, "questions",
                   ("https://visualqa.org/download.html (questions, annotations)",
                    "https://cocodataset.org/#download (train2014, val2014, test2015 images)"))
# split -> (subtype in the file names, image folder, has annotations)
SUBSETS = {"train": ("train2014", "train2014", True), "val": ("val2014", "val2014", True),
           "test-dev": ("test-dev2015", "test2015", False), "test": ("test2015", "test2015", False)}
ANN_DIRS = ("", "questions", "annotations", "Questions", "Annotations")
IMAGE_DIRS = ("images", ".")
DEFAULTS: dict[str, Any] = {"splits": None, "vocab": None, "min_count": 9, "image_dir": None}


def prepare(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False, **options: Any) -> PrepReport:
    """VQAv2 originals in `raw` -> `<out>/<split>.index.json` (kind vqa) + `<out>/ans2label.json`.
    Options: `splits` (list or comma string), `vocab` (an ans2label JSON), `min_count`, `image_dir`."""
    raw, out = Path(raw), Path(out)
    opts = parse_options(options, DEFAULTS, "vqav2 prep")
    if not raw.is_dir():
        raise UserError(f"raw folder not found; {INFO.where_to_get()}", where=str(raw))
    names = {s: f"v2_OpenEnded_mscoco_{SUBSETS[s][0]}_questions.json" for s in SUBSETS}
    splits = pick_splits(opts["splits"], names, raw, ANN_DIRS, INFO, "vqav2 prep")
    q_files = {s: find_input(raw, [names[s]], INFO, ANN_DIRS) for s in splits}
    a_files = {s: find_input(raw, [f"v2_mscoco_{SUBSETS[s][0]}_annotations.json"], INFO, ANN_DIRS)
               for s in splits if SUBSETS[s][2]}
    vocab_path = vocab_file(raw, opts["vocab"])
    image_dir = _image_dir(raw, opts["image_dir"], [SUBSETS[s][1] for s in splits])
    inputs = [*q_files.values(), *a_files.values(), *([vocab_path] if vocab_path else [])]
    run = PrepRun.start(INFO, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=inputs, media_dirs=[image_dir])  # type: ignore[list-item]
    if run.report.up_to_date:
        return run.report

    from mdpd_vl.eval.vqa import normalize_answer  # the official normalisation, shared with the evaluator

    records = {s: _records(s, q_files[s], a_files.get(s), run) for s in splits}  # type: ignore[arg-type]
    ans2label: dict[str, int] = {}
    if vocab_path:
        ans2label = load_vocab(vocab_path)
    elif a_files:  # test splits alone: no answers to build a vocabulary from, so none is written
        counts = Counter(normalize_answer(ann["multiple_choice_answer"]) for recs in records.values()
                         for _, ann in recs if ann is not None and isinstance(ann.get("multiple_choice_answer"), str))
        ans2label = build_vocab(counts, int(opts["min_count"]))
    items: dict[str, list[dict[str, Any]]] = {}
    used: dict[Path, set[str]] = {}
    for split, recs in records.items():
        folder = SUBSETS[split][1]
        items[split] = []
        for q, ann in recs:
            rel = f"{folder}/COCO_{folder}_{int(q['image_id']):012d}.jpg"
            used.setdefault(image_dir / rel, set()).add(split)
            items[split].append(_item(q, ann, rel, ans2label, normalize_answer))
    bad = run.verify(used, check_image)
    return run.finish([SplitIndex(s, "vqa", image_dir, [it for it in its if image_dir / it["image"] not in bad])
                       for s, its in items.items()], extra_files={VOCAB_FILE: ans2label} if ans2label else None)


def soft_score(matches: int, total: int = 10) -> float:
    """Official leave-one-out VQA accuracy of an answer given by `matches` of `total` annotators."""
    if matches <= 0 or total <= 0:
        return 0.0
    m, n = matches, total
    return round((m * min(1.0, (m - 1) / 3) + (n - m) * min(1.0, m / 3)) / n, 4)


def pick_splits(requested: Any, names: dict[str, str], raw: Path, subdirs: Sequence[str], info: DatasetInfo,
                where: str) -> list[str]:
    """The requested splits (list or comma string; an unknown name is a UserError listing the valid
    ones), or by default every split whose file exists."""
    if requested:
        wanted = [s.strip() for s in (requested.split(",") if isinstance(requested, str) else requested)]
        for s in wanted:
            if s not in names:
                raise UserError(f"split {s!r} does not exist; valid: {', '.join(names)}", where=where, field="splits")
        return wanted
    present = [s for s, n in names.items() if find_input(raw, [n], info, subdirs, required=False)]
    if not present:
        raise UserError(f"none of {', '.join(names.values())} found; {info.where_to_get()}", where=str(raw))
    return present


def vocab_file(raw: Path, given: Any) -> Path | None:
    """The `vocab` option as a path (relative to `raw` unless absolute), checked to exist."""
    if not given:
        return None
    path = raw / Path(given)
    if not path.is_file():
        raise UserError("answer vocabulary not found", where=str(path), field="vocab")
    return path


def load_vocab(path: Path) -> dict[str, int]:
    """An answer vocabulary: `{answer: index}` (trainval_ans2label.json) or a list (label2ans)."""
    data = read_json(path, INFO)
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return {a: i for i, a in enumerate(data)}
    if isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        if sorted(data.values()) != list(range(len(data))):
            raise UserError("indices must be 0..N-1 without gaps", where=str(path), field="vocab")
        return dict(data)
    raise UserError("expected {answer: index} or [answer, ...]", where=str(path), field="vocab")


def build_vocab(counts: Counter, min_count: int) -> dict[str, int]:
    """Answers seen at least `min_count` times, most frequent first (ties alphabetical) -> index."""
    kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    if not kept:
        raise UserError(f"no answer occurs {min_count} times; lower min_count or pass vocab", field="min_count")
    return {a: i for i, a in enumerate(kept)}


def _image_dir(raw: Path, given: Any, folders: list[str]) -> Path:
    if given is not None:
        path = raw / Path(given)
        if not path.is_dir():
            raise UserError(f"image folder not found; {INFO.where_to_get()}", where=str(path), field="image_dir")
        return path.resolve()
    for cand in IMAGE_DIRS:  # the folder that holds train2014/ etc.
        if all((raw / cand / f).is_dir() for f in folders):
            return (raw / cand).resolve()
    return raw.resolve()  # every image will be reported missing, with where to get them


def _records(split: str, q_file: Path, a_file: Path | None, run: PrepRun) -> list[tuple[dict, dict | None]]:
    """(question, annotation or None) per well-formed question; the others are recorded as bad."""
    qdata = read_json(q_file, INFO)
    expect(isinstance(qdata, dict) and isinstance(qdata.get("questions"), list),
           "expected {'questions': [...]}", q_file, "questions")
    anns: dict[Any, dict] = {}
    if a_file is not None:
        adata = read_json(a_file, INFO)
        expect(isinstance(adata, dict) and isinstance(adata.get("annotations"), list),
               "expected {'annotations': [...]}", a_file, "annotations")
        anns = {a["question_id"]: a for a in adata["annotations"]
                if isinstance(a, dict) and isinstance(a.get("question_id"), (int, str))}
    out = []
    for k, q in enumerate(qdata["questions"]):
        if not (isinstance(q, dict) and isinstance(q.get("image_id"), int) and isinstance(q.get("question"), str)
                and q["question"].strip() and isinstance(q.get("question_id"), (int, str))
                and not isinstance(q.get("image_id"), bool)):
            run.bad(q_file, f"questions[{k}]: needs question_id, image_id (int) and a non-blank question", split)
            continue
        ann = anns.get(q["question_id"]) if a_file is not None else None
        if a_file is not None:
            answers = ann.get("answers") if ann else None
            if ann is None or not isinstance(answers, list) or not answers:
                what = "no annotation" if ann is None else "empty answer list"
                run.bad(a_file, f"question {q['question_id']}: {what}", split)
                continue
            if not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
                run.bad(a_file, f"question {q['question_id']}: every answer needs an 'answer' string", split)
                continue
        out.append((q, ann))
    return out


def _item(q: dict, ann: dict | None, rel: str, ans2label: dict[str, int], normalize: Any) -> dict[str, Any]:
    raw_answers = [] if ann is None else [
        {"answer": a["answer"], "answer_id": a.get("answer_id"), "answer_confidence": a.get("answer_confidence")}
        for a in ann["answers"]]
    counts = Counter(normalize(a["answer"]) for a in raw_answers)
    answers = {a: soft_score(m, len(raw_answers)) for a, m in counts.items() if a in ans2label}
    return {"question_id": q["question_id"], "image": rel, "image_id": q["image_id"], "question": q["question"],
            "answers": answers, "answer_type": (ann or {}).get("answer_type", ""),
            "question_type": (ann or {}).get("question_type", ""), "raw_answers": raw_answers}
