"""GQA (balanced): `{split}_balanced_questions.json` (a dict questionId -> record) and the images.

Layout (`--raw DIR`): `DIR/{train,val,testdev,test,challenge}_balanced_questions.json` (or under
`questions/`); images `DIR/images/{imageId}.jpg` (or `--image-dir`). By default every split whose file
is present. `test` and `challenge` have no answers (`answer` is null there). The answer vocabulary is
an existing `trainval_ans2label.json` (`vocab`) or every answer of the train and val splits seen at
least `min_count` times; it is written as `<out>/ans2label.json` together with the indexes (not when
only test splits are prepared without one).
Answers are kept verbatim: official GQA accuracy is exact match without normalisation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mdpd_vl.data.prep.common import (
    DatasetInfo,
    PrepReport,
    PrepRun,
    SplitIndex,
    expect,
    find_input,
    first_dir,
    parse_options,
    read_json,
)
from mdpd_vl.data.prep.media import check_image
from mdpd_vl.data.prep.vqav2 import VOCAB_FILE, build_vocab, load_vocab, pick_splits, vocab_file
from mdpd_vl.errors import UserError

CODE_VERSION = 1
INFO = DatasetInfo("gqa", {"train": 943000, "val": 132062, "testdev": 12578, "test": 95336, "challenge": 50726},
                   "questions", ("https://cs.stanford.edu/people/dorarad/gqa/download.html "
                                 "(questions1.2.zip, images.zip)",))
SPLITS = ("train", "val", "testdev", "test", "challenge")
ANSWERED = ("train", "val", "testdev")
ANN_DIRS = ("", "questions", "questions1.2")
IMAGE_DIRS = ("images", "allImages/images")
DEFAULTS: dict[str, Any] = {"splits": None, "vocab": None, "min_count": 1, "image_dir": None}


def prepare(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False, **options: Any) -> PrepReport:
    """GQA balanced questions in `raw` -> `<out>/<split>.index.json` (kind gqa) + `<out>/ans2label.json`.
    Options: `splits` (list or comma string), `vocab` (an ans2label JSON), `min_count`, `image_dir`."""
    raw, out = Path(raw), Path(out)
    opts = parse_options(options, DEFAULTS, "gqa prep")
    if not raw.is_dir():
        raise UserError(f"raw folder not found; {INFO.where_to_get()}", where=str(raw))
    names = {s: f"{s}_balanced_questions.json" for s in SPLITS}
    splits = pick_splits(opts["splits"], names, raw, ANN_DIRS, INFO, "gqa prep")
    files = {s: find_input(raw, [names[s]], INFO, ANN_DIRS) for s in splits}
    vocab_path = vocab_file(raw, opts["vocab"])
    image_dir = first_dir(raw, IMAGE_DIRS, opts["image_dir"], INFO, "image")
    inputs = [*files.values(), *([vocab_path] if vocab_path else [])]
    run = PrepRun.start(INFO, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=inputs, media_dirs=[image_dir])  # type: ignore[list-item]
    if run.report.up_to_date:
        return run.report

    items = {s: _items(s, files[s], run) for s in splits}  # type: ignore[arg-type]
    ans2label: dict[str, int] = {}
    if vocab_path:
        ans2label = load_vocab(vocab_path)
    elif any(s in ANSWERED for s in splits):  # test splits alone: no vocabulary is written
        source = [s for s in splits if s in ("train", "val")] or [s for s in splits if s in ANSWERED]
        counts = Counter(it["answer"] for s in source for it in items[s])
        ans2label = build_vocab(counts, int(opts["min_count"]))
    used: dict[Path, set[str]] = {}
    for split, its in items.items():
        for it in its:
            used.setdefault(image_dir / it["image"], set()).add(split)
    bad = run.verify(used, check_image)
    return run.finish([SplitIndex(s, "gqa", image_dir, [it for it in its if image_dir / it["image"] not in bad])
                       for s, its in items.items()], extra_files={VOCAB_FILE: ans2label} if ans2label else None)


def _items(split: str, path: Path, run: PrepRun) -> list[dict[str, Any]]:
    """One item per well-formed question; the others are recorded as bad."""
    data = read_json(path, INFO)
    expect(isinstance(data, dict), "expected a dict questionId -> question record", path)
    answered = split in ANSWERED
    out = []
    for qid, rec in data.items():
        if (not isinstance(rec, dict) or not isinstance(rec.get("imageId"), str) or not rec["imageId"]
                or not isinstance(rec.get("question"), str) or not rec["question"].strip()):
            run.bad(path, f"question {qid}: needs an imageId and a non-blank question", split)
            continue
        answer = rec.get("answer")
        if answered and (not isinstance(answer, str) or not answer.strip()):
            run.bad(path, f"question {qid}: no answer (every {split} question has one)", split)
            continue
        types = rec.get("types") if isinstance(rec.get("types"), dict) else {}
        out.append({"question_id": str(qid), "image": f"{rec['imageId']}.jpg", "image_id": str(rec["imageId"]),
                    "question": rec["question"], "answer": answer if answered else None,
                    "structural": types.get("structural"), "semantic": types.get("semantic"),
                    "is_balanced": bool(rec.get("isBalanced", True))})
    return out
