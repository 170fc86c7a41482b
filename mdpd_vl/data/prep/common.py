"""Shared machinery of the dataset readers: options, input lookup, the bad-input report, the
up-to-date check, the all-or-nothing atomic write of the canonical indexes and the CLI plumbing
(the media checks themselves are in `media.py`).

Every reader follows the same path: `PrepRun.start` (validate options, fingerprint the inputs, return
early when the existing indexes are up to date), read the originals and record every bad file with
`run.bad(...)`, verify media with `run.verify`, then `run.finish(splits)` which either raises one
`BadInputError` listing everything (nothing written) or writes all split indexes at once.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdpd_vl import atomic
from mdpd_vl.data.prep.media import verify_files
from mdpd_vl.errors import UserError

INDEX_FORMAT = "mdpd_vl.index"
INDEX_VERSION = 1
REPORT_NAME = "prep_report.json"
# Options every reader accepts besides its own (see `PrepRun.start`).
COMMON_OPTIONS: dict[str, Any] = {"name": None, "workers": 4}


@dataclass(frozen=True)
class DatasetInfo:
    """What the count check and the 'where to get it' message need to know about one dataset layout."""

    name: str
    official: Mapping[str, int]  # split -> size of the official release, in `unit`
    unit: str
    urls: Sequence[str]

    def where_to_get(self) -> str:
        """One line naming where the originals are published."""
        return f"the {self.name} originals are published at: " + " ; ".join(self.urls)


@dataclass(frozen=True)
class Problem:
    """One bad input: the file (or annotation file plus a locator in `reason`) and why it is bad."""

    path: str
    reason: str
    split: str | None = None

    def line(self) -> str:
        """The problem as one indented report line."""
        return f"  [{self.split or '-'}] {self.path}: {self.reason}"


@dataclass
class SplitIndex:
    """The items of one split, ready to be written as `<out>/<split>.index.json`."""

    split: str
    kind: str
    media_root: Path
    items: list[dict[str, Any]]
    count: int | None = None  # size in the dataset's official unit when it differs from len(items)


@dataclass
class PrepReport:
    """What a `prepare` call did: items written per split, bad inputs skipped, warnings."""

    dataset: str
    out: Path
    fingerprint: str = ""
    splits: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    up_to_date: bool = False

    def to_json(self) -> dict[str, Any]:
        """The content of `prep_report.json`."""
        return {
            "format": "mdpd_vl.prep_report", "version": INDEX_VERSION, "dataset": self.dataset,
            "fingerprint": self.fingerprint, "splits": self.splits, "warnings": self.warnings,
            "skipped": [{"split": p.split, "path": p.path, "reason": p.reason} for p in self.problems],
        }


class BadInputError(UserError):
    """Raised when bad inputs were found and `skip_bad` is off; `report.problems` lists all of them."""

    def __init__(self, report: PrepReport, raw: Path):
        n = len(report.problems)
        super().__init__(
            f"{n} bad input{'s' if n != 1 else ''} (listed above); no index written; "
            "--skip-bad writes the index without them", where=str(raw), field=report.dataset)
        self.report = report


def say(message: str) -> None:
    """Progress and warnings go to stderr so that stdout stays for results."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- inputs

def parse_options(options: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Merge `options` over `defaults` (plus the common ones); an unknown option is a UserError."""
    allowed = {**COMMON_OPTIONS, **defaults}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}; valid: {', '.join(sorted(allowed))}",
                        where=where, field=unknown[0])
    merged = {**allowed, **{k: v for k, v in options.items() if v is not None}}
    if int(merged["workers"]) < 1:
        raise UserError("must be >= 1", where=where, field="workers")
    return merged


def choose(value: str, valid: Sequence[str], where: str, field_name: str) -> str:
    """Return `value` if it is one of `valid`, else a UserError listing the valid ones."""
    if value not in valid:
        raise UserError(f"{value!r} is not one of {', '.join(valid)}", where=where, field=field_name)
    return value


def find_input(raw: Path, names: Sequence[str], info: DatasetInfo, subdirs: Sequence[str] = ("",),
               *, required: bool = True) -> Path | None:
    """First of `raw/<subdir>/<name>` that exists; when none does and `required`, a UserError that
    names what was looked for and where the originals are published."""
    for sub in subdirs:
        for name in names:
            path = raw / sub / name
            if path.exists():
                return path
    if not required:
        return None
    looked = ", ".join(str(Path(sub) / n) for sub in subdirs for n in names)
    raise UserError(f"not found (looked for {looked}); {info.where_to_get()}", where=str(raw))


def first_dir(raw: Path, candidates: Sequence[str], given: str | Path | None, info: DatasetInfo,
              what: str) -> Path:
    """The media folder: `given` when set (relative to `raw` unless absolute), else the first existing
    candidate under `raw`."""
    if given is not None:
        path = raw / Path(given)
        if not path.is_dir():
            raise UserError(f"{what} folder not found; {info.where_to_get()}", where=str(path))
        return path.resolve()
    for cand in candidates:
        path = raw / cand
        if path.is_dir():
            return path.resolve()
    raise UserError(f"no {what} folder (looked for {', '.join(candidates)}); {info.where_to_get()}",
                    where=str(raw))


def read_text(path: Path, info: DatasetInfo | None = None, *, whole_lines: bool = False) -> str:
    """The UTF-8 text of an annotation file (a UTF-8 BOM is dropped). Unreadable, not UTF-8, binary
    (a NUL byte) or, with `whole_lines`, cut inside its last line (no final line break): one
    UserError naming the file and the line."""
    where = str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read ({err.strerror or type(err).__name__})", where=where) from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    hint = f"; {info.where_to_get()}" if info is not None else ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"not UTF-8 text (byte 0x{data[err.start]:02x}, {err.reason}); the file is corrupt or in "
                        f"another encoding: save it as UTF-8{hint}", where=where, field=f"line {line}") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"holds a NUL byte: not a text file, or a corrupt one{hint}", where=where,
                        field=f"line {line}")
    if whole_lines and text and not text.endswith(("\n", "\r")):
        line = text.count("\n") + 1
        raise UserError(f"ends inside this line (no final line break): the file looks truncated; if it is "
                        f"whole, add the final line break{hint}", where=where, field=f"line {line}")
    return text


def read_json(path: Path, info: DatasetInfo) -> Any:
    """Parse a JSON file; a truncated, corrupt, mis-encoded or unreadable file is one UserError naming
    the position."""
    text = read_text(path, info)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                        f"the file looks truncated or corrupt; {info.where_to_get()}", where=str(path)) from None
    except RecursionError:
        raise UserError(f"not valid JSON (nested too deeply); {info.where_to_get()}", where=str(path)) from None


def expect(cond: bool, message: str, path: Path, field_name: str | None = None) -> None:
    """Structural check of an annotation file: a UserError naming file and field when `cond` fails."""
    if not cond:
        raise UserError(message, where=str(path), field=field_name)


def read_csv(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header. Checked: UTF-8, a header holding `columns`, every row as wide as
    the header, no quoted field left open, a final line break (a cut download ends without one). Each
    problem is a UserError naming the file and the line (or the missing column)."""
    text = read_text(path, whole_lines=True)
    if not text.strip():
        raise UserError(f"is empty (expected a header with {','.join(columns)})", where=str(path), field=columns[0])
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        for col in columns:
            if col not in header:
                raise UserError(f"no column {col!r} (header: {','.join(header)})", where=str(path), field=col)
        rows = []
        for cells in reader:
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise UserError(f"{len(cells)} fields, the header has {len(header)}: a cut or malformed row",
                                where=str(path), field=f"line {reader.line_num}")
            rows.append({k: v.strip() for k, v in zip(header, cells)})
    except csv.Error as err:
        raise UserError(f"not valid CSV ({err}): the file looks truncated or corrupt", where=str(path),
                        field=f"line {reader.line_num}") from None
    return rows


def read_lines(path: Path, *, whole_lines: bool = False) -> list[str]:
    """Non-blank stripped lines of a UTF-8 text file; files that lack a final newline (MSVD's lists)
    read the same unless `whole_lines` (captions files, whose last line would be cut)."""
    return [line.strip() for line in read_text(path, whole_lines=whole_lines).splitlines() if line.strip()]


# ------------------------------------------------------------------------------ fingerprint + write

def fingerprint(dataset: str, code_version: int, inputs: Iterable[Path], media_dirs: Iterable[Path],
                options: Mapping[str, Any], out: Path | None = None) -> str:
    """Hash of what the index depends on: annotation files (size, mtime), media folders and their
    direct sub-folders (mtime changes when files are added or removed), options and code version.
    Folders that hold `out` are left out: writing the index must not change the fingerprint."""
    out_r = out.resolve() if out is not None else None

    def holds_out(path: Path) -> bool:
        return out_r is not None and (path == out_r or path in out_r.parents)

    def stat(path: Path) -> list[Any]:
        st = path.stat()
        return [str(path), st.st_size if path.is_file() else 0, st.st_mtime_ns]

    dirs: list[list[Any]] = []
    for d in sorted({p.resolve() for p in media_dirs}):
        if not holds_out(d):
            dirs.append(stat(d))
        dirs.extend(stat(sub) for sub in sorted(d.iterdir()) if sub.is_dir() and not holds_out(sub))
    opts = {k: str(v) for k, v in sorted(options.items()) if k != "workers"}
    blob = json.dumps([dataset, code_version, INDEX_VERSION, [stat(p.resolve()) for p in sorted(set(inputs))],
                       dirs, opts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` via a temp file in the same folder and os.replace."""
    commit_files(path.parent, {path.name: obj})


def commit_files(out: Path, files: Mapping[str, Any]) -> None:
    """Write every file to a temp name first, then move them all in place: a failure while writing
    (full disk: one `WriteError` line naming the bytes needed) leaves the previous files untouched
    and no temp file behind (`mdpd_vl.atomic.write_files`)."""
    blobs = {name: json.dumps(obj, ensure_ascii=False) for name, obj in files.items()}
    atomic.write_files(out, blobs)


def _load_header(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------------- run

class PrepRun:
    """One `prepare` call: collects bad inputs, then writes every split or none."""

    def __init__(self, info: DatasetInfo, raw: Path, out: Path, options: dict[str, Any], *,
                 force: bool, skip_bad: bool):
        self.info, self.raw, self.out = info, Path(raw), Path(out)
        self.options, self.force, self.skip_bad = options, force, skip_bad
        # A custom name means the data is not the official release, so its sizes are not checked.
        self.name: str = options.get("name") or info.name
        self.check_counts = self.name == info.name
        self.workers = int(options.get("workers", 1))
        self.problems: list[Problem] = []
        self.report = PrepReport(dataset=self.name, out=self.out)

    @classmethod
    def start(cls, info: DatasetInfo, raw: Path, out: Path, options: dict[str, Any], *, force: bool,
              skip_bad: bool, code_version: int, inputs: Iterable[Path],
              media_dirs: Iterable[Path]) -> PrepRun:
        """Fingerprint the inputs; `run.report.up_to_date` is True when nothing needs to be done."""
        atomic.check_dir(out, "out")  # before the media check: a bad output path fails in a second
        run = cls(info, raw, out, options, force=force, skip_bad=skip_bad)
        run.report.fingerprint = fingerprint(run.name, code_version, inputs, media_dirs, options, run.out)
        if not force and run._existing_is_current():
            run.report.up_to_date = True
            print(f"{run.name}: up to date in {run.out} (--force rebuilds)")
        return run

    def _existing_is_current(self) -> bool:
        # Only indexes carrying the current fingerprint count; older ones of other splits may sit beside them.
        headers = {}
        for path in sorted(self.out.glob("*.index.json")) if self.out.is_dir() else []:
            head = _load_header(path)
            if (head and head.get("format") == INDEX_FORMAT and head.get("dataset") == self.name
                    and head.get("version") == INDEX_VERSION and head.get("fingerprint") == self.report.fingerprint):
                headers[head.get("split")] = head
        expected = next(iter(headers.values())).get("splits") if headers else None
        return bool(expected) and all(s in headers and headers[s].get("splits") == expected for s in expected)

    def bad(self, path: Path | str, reason: str, split: str | None = None) -> None:
        """Record one bad input; all of them are reported together by `finish`."""
        self.problems.append(Problem(str(path), reason, split))

    def verify(self, used: Mapping[Path, Iterable[str]], check: Callable[[Path], str | None]) -> set[Path]:
        """Check each media file once, record each bad one with the splits that use it; the bad paths."""
        if used:
            say(f"{self.name}: checking {len(used)} media files ...")
        bad = verify_files({p: functools.partial(check, p) for p in used}, self.workers)
        for path, reason in bad.items():
            self.bad(path, reason, ",".join(sorted(set(used[path]))) or None)
        return set(bad)

    def finish(self, splits: list[SplitIndex], extra_files: Mapping[str, Any] | None = None) -> PrepReport:
        """Report bad inputs (raise, or skip them when `skip_bad`), check official sizes, then write
        every split index (plus `extra_files`) atomically; returns the report."""
        report = self.report
        report.problems = list(self.problems)
        if self.problems:
            verb = "skipped" if self.skip_bad else "found"
            say(f"{self.name}: {len(self.problems)} bad input(s) {verb}:")
            for prob in self.problems:
                say(prob.line())
            if any(p.reason == "missing" or p.reason.startswith("missing") for p in self.problems):
                say(self.info.where_to_get())
            if not self.skip_bad:
                raise BadInputError(report, self.raw)
        empty = [s.split for s in splits if not s.items]
        if empty:
            report.warnings.append(f"no items left in split(s) {', '.join(empty)}; not written")
        splits = [s for s in splits if s.items]
        if not splits:
            raise UserError("no items to write (every split is empty)", where=str(self.raw))
        if self.check_counts:
            warning = self._count_warning(splits)
            if warning:
                report.warnings.append(warning)
        for warning in report.warnings:
            say(f"warning: {self.name}: {warning}")
        self._write(splits, extra_files or {}, empty)
        return report

    def _count_warning(self, splits: list[SplitIndex]) -> str | None:
        diffs = []
        for s in splits:
            n = s.count if s.count is not None else len(s.items)
            official = self.info.official.get(s.split)
            if official is not None and n != official:
                diffs.append(f"{s.split} {n:,} of {official:,}")
        if not diffs:
            return None
        return f"split sizes differ from the official release ({'; '.join(diffs)} {self.info.unit})"

    def _write(self, splits: list[SplitIndex], extra_files: Mapping[str, Any], emptied: list[str]) -> None:
        report, names = self.report, [s.split for s in splits]
        files: dict[str, Any] = dict(extra_files)
        for s in splits:
            files[f"{s.split}.index.json"] = {
                "format": INDEX_FORMAT, "version": INDEX_VERSION, "dataset": self.name, "split": s.split,
                "kind": s.kind, "media_root": str(Path(s.media_root).resolve()),
                "fingerprint": report.fingerprint, "splits": names, "items": s.items,
            }
            report.splits[s.split] = len(s.items)
        if self.skip_bad:
            files[REPORT_NAME] = report.to_json()
        commit_files(self.out, files)
        self._remove_stale(emptied)
        summary = ", ".join(f"{s} ({n:,} items)" for s, n in report.splits.items())
        print(f"{self.name}: wrote {summary} to {self.out}")

    def _remove_stale(self, emptied: list[str]) -> None:
        # A split this run read but left empty must not keep an older index that loaders would pick up;
        # splits this run did not read (e.g. not in `splits`) are left alone.
        for split in emptied:
            head = _load_header(self.out / f"{split}.index.json")
            if head and head.get("dataset") == self.name:
                (self.out / f"{split}.index.json").unlink()
        report = self.out / REPORT_NAME
        if not self.skip_bad and report.is_file():
            head = _load_header(report)
            if head and head.get("dataset") == self.name:
                report.unlink()


# ------------------------------------------------------------------------------------------- CLI

class _PrepParser(argparse.ArgumentParser):
    """argparse, but a missing --raw/--out (e.g. no arguments at all) is one line that also says
    where the originals are published, exit status 2."""

    dataset = ""

    def error(self, message: str) -> Any:  # type: ignore[override]
        if "required" in message:
            hint = _published_at(self.dataset)
            self.exit(2, f"error: {self.prog} needs --raw DIR (the originals as distributed) and --out DIR "
                         f"({message}){'; ' + hint if hint else ''}\n")
        super().error(message)


def _published_at(dataset: str) -> str:
    from mdpd_vl.data.prep import published_at  # the readers import this module

    return published_at(dataset)


def base_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The options every data_prep script shares."""
    parser = _PrepParser(prog=f"data_prep/{name}.py", description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.dataset = name
    parser.add_argument("--raw", type=Path, required=True, help="folder holding the originals as distributed")
    parser.add_argument("--out", type=Path, required=True, help="folder for <split>.index.json")
    parser.add_argument("--force", action="store_true", help="rebuild even when the index is up to date")
    parser.add_argument("--skip-bad", action="store_true",
                        help="write the index without bad files, listed in prep_report.json")
    parser.add_argument("--workers", type=int, default=COMMON_OPTIONS["workers"],
                        help="threads for the media checks")
    parser.add_argument("--name", default=None,
                        help="dataset name written into the index; a custom name skips the official-size check")
    return parser


def run_cli(prepare: Callable[..., PrepReport], args: argparse.Namespace, option_names: Sequence[str]) -> int:
    """Call `prepare` with the parsed arguments; returns the exit status (errors raise UserError).
    The output folder is checked first, before any file is read."""
    atomic.check_paths(out_dirs={"--out": args.out}, in_dirs={"--raw": args.raw})
    options = {k: getattr(args, k) for k in ("workers", "name", *option_names)}
    prepare(args.raw, args.out, force=args.force, skip_bad=args.skip_bad, **options)
    return 0
