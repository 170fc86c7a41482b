"""File I/O of the evaluation CLI: read the official formats with one-line errors, print metric
tables, write the results JSON atomically."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mdpd_vl.errors import UserError

INDEX_FORMAT = "mdpd_vl.index"
RESULT_FORMAT = "mdpd_vl.eval_result"


@contextlib.contextmanager
def blame(path: str | Path, **by_where: str | Path) -> Iterator[None]:
    """Re-raise a UserError from the metric code with the file it came from in front: the file
    named for the error's `where` (e.g. predictions=...) in `by_where`, else `path`."""
    try:
        yield
    except UserError as err:
        raise UserError(str(err), where=str(by_where.get(err.where or "", path))) from None


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UserError("no such file" if not p.exists() else "not a file", where=str(p))
    return p


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing file or bad JSON is a one-line UserError."""
    p = _existing(path)
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"not valid JSON ({err})", where=str(p)) from None
    except OSError as err:
        raise UserError(f"cannot read ({err.strerror or type(err).__name__})", where=str(p)) from None


def is_index(obj: Any) -> bool:
    """True for a canonical `<split>.index.json` written by data_prep."""
    return isinstance(obj, Mapping) and obj.get("format") == INDEX_FORMAT


def index_items(obj: Mapping[str, Any], kinds: Sequence[str], path: str | Path) -> list[dict]:
    """The items of a canonical index, after checking its kind."""
    if obj.get("kind") not in kinds:
        raise UserError(f"index kind is {obj.get('kind')!r}, expected one of {list(kinds)}",
                        where=str(path), field="kind")
    items = obj.get("items")
    if not isinstance(items, list):
        raise UserError("index has no 'items' list", where=str(path), field="items")
    return items


def load_matrix(path: str | Path) -> np.ndarray:
    """A similarity matrix saved with `np.save` (pickles are refused)."""
    p = _existing(path)
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, EOFError) as err:  # EOFError: an empty file
        raise UserError(f"not a plain .npy array ({err}); save the matrix with np.save(path, sims)",
                        where=str(p)) from None
    except OSError as err:
        raise UserError(f"cannot read as .npy ({err})", where=str(p)) from None
    if isinstance(arr, np.lib.npyio.NpzFile):
        raise UserError("an .npz archive; save the matrix alone with np.save", where=str(p))
    return arr


def load_mapping(path: str | Path, key: str) -> np.ndarray:
    """Owner index of every caption/text row: .npy int array, .txt (one int per line), a JSON list,
    a JSON object holding `key`, or a canonical index (each item's captions, in order)."""
    p = _existing(path)
    if p.suffix == ".npy":
        return load_matrix(p)
    if p.suffix == ".json":
        obj = load_json(p)
        if is_index(obj):
            items = index_items(obj, ("image_text", "image_region", "video_text"), p)
            counts = []
            for i, item in enumerate(items):
                caps = item.get("captions")
                if not isinstance(caps, list):
                    raise UserError(f"item {i} has no 'captions' list", where=str(p), field="captions")
                counts.append(len(caps))
            return np.repeat(np.arange(len(items)), counts)
        if isinstance(obj, Mapping):
            if key not in obj:
                raise UserError(f"expected a list or an object with '{key}'", where=str(p), field=key)
            obj = obj[key]
        if not isinstance(obj, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in obj):
            raise UserError("expected a list of integers", where=str(p), field=key)
        return np.asarray(obj, dtype=np.int64)
    values = []
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.reason if isinstance(err, UnicodeDecodeError) else err.strerror
        raise UserError(f"cannot read as UTF-8 text ({reason})", where=str(p)) from None
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                values.append(int(line.strip()))
            except ValueError:
                raise UserError(f"line {n} is not an integer: {line.strip()[:40]!r}",
                                where=str(p)) from None
    return np.asarray(values, dtype=np.int64)


def records(obj: Any, fields: Sequence[str], path: str | Path) -> list[Mapping[str, Any]]:
    """A JSON list of objects that all carry `fields` (official results files)."""
    if not isinstance(obj, list):
        raise UserError(f"expected a list of {{{', '.join(fields)}}} objects", where=str(path))
    for i, rec in enumerate(obj):
        if not isinstance(rec, Mapping):
            raise UserError(f"entry {i} is not an object", where=str(path))
        for f in fields:
            if f not in rec:
                raise UserError(f"entry {i} has no '{f}'", where=str(path), field=f)
    return obj


def unique_map(recs: Sequence[Mapping[str, Any]], key: str, value: str, path: str | Path) -> dict:
    """{rec[key]: rec[value]}; a key given twice is an error (the official loaders keep the last)."""
    out: dict[Any, Any] = {}
    for rec in recs:
        k = rec[key]
        if k in out:
            raise UserError(f"{key} {k} appears twice", where=str(path), field=key)
        out[k] = rec[value]
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain aligned text table; floats with two decimals, None as '-'."""
    cells = [list(header)] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title] if title else []
    for j, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def retrieval_table(m: Mapping[str, float], a: str, b: str, title: str) -> str:
    """R@1/5/10, median and mean rank for both directions `a` and `b` (e.g. i2t/t2i), plus rsum."""
    head = ["direction", "R@1", "R@5", "R@10", "medr", "meanr"]
    rows = [[d] + [m[f"{d}_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")] for d in (a, b)]
    return table(head, rows, title) + f"\nrsum {_fmt(m['rsum'])}"


def write_result(path: str | Path, task: str, inputs: Mapping[str, Any],
                 metrics: Mapping[str, Any]) -> None:
    """Write {format, task, inputs, metrics} as JSON, atomically (nothing half-written)."""
    from mdpd_vl.engine.config import atomic_write_text

    p = Path(path)
    if not p.parent.is_dir():
        raise UserError("the output folder does not exist", where=str(p.parent), field="--out")
    payload = {"format": RESULT_FORMAT, "version": 1, "task": task,
               "inputs": {k: v if v is None or isinstance(v, int | float) else str(v)
                          for k, v in inputs.items()}, "metrics": metrics}
    atomic_write_text(p, json.dumps(payload, indent=2, sort_keys=False) + "\n")
