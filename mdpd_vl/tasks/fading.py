"""The fading frontier (issue 16): `python -m mdpd_vl.tasks.fading [--rows configs/itr/frontier.yaml]`.

Runs every row of a rows file (a name + `--set` overrides of the ITR recipe) for every seed under the
research protocol (`protocol:`, e.g. configs/itr/research.yaml), each as its own
`python -m mdpd_vl.tasks.itr` process in `<output_dir>/research/<row>/seed<S>`, skipping runs whose
`results.json` holds the same command, and keeps a compact record of every finished run (`records:`,
tasks/fading/records/<research|full>/<row>/seed<S>.json: what the report reads, committed with the card,
so a fresh clone rebuilds the card and skips the runs it holds); then writes the card (`card:`, tasks/fading.md: the table with
every command, mean +- spread over seeds, the target check and the ranking check) and the chart
(`chart:`). `--full` also runs the `ranking:` rows under `full_protocol:` (the protocol of
tasks/itr.md) into `<output_dir>/full/`, so that the research protocol's ranking can be checked
against it. `--report-only` trains nothing. Nothing is measured here: every number comes from a run.

Run one at a time on a quiet machine: the rows record step times.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mdpd_vl.engine.checkpoint import flatten
from mdpd_vl.engine.config import atomic_write_text, load_config
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.tasks import fading_latency as latency
from mdpd_vl.tasks import fading_report as report

ITR = "mdpd_vl.tasks.itr"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Row:
    """One configuration of the frontier: a name and the `--set` overrides of the ITR recipe."""

    name: str
    overrides: list[str]
    note: str = ""


@dataclass
class Frontier:
    """A rows file: the protocols, the seeds, where outputs go, the rows and the checks."""

    path: Path
    protocol: str
    rows: list[Row]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "runs/fading"
    card: str = "tasks/fading.md"
    chart: str = "tasks/fading.png"
    reference: str | None = None
    ranking: list[str] = field(default_factory=list)
    full_config: str | None = None
    full_overrides: list[str] = field(default_factory=list)
    full_seeds: list[int] = field(default_factory=lambda: [0])
    records: str = ""  # "" = <card's folder>/<card's stem>/records

    def __post_init__(self) -> None:
        if not self.records:
            card = Path(self.card)
            self.records = str(card.parent / card.stem / "records")

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.name == name)


def _strings(value: Any, where: str, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise UserError("must be a list of 'key=value' overrides", where=where, field=name)
    return list(value)


def _ints(value: Any, where: str, name: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        raise UserError(f"must be a non-empty list of integers, got {value!r}", where=where, field=name)
    return list(value)


def load_frontier(path: str | Path) -> Frontier:
    """Read and check a rows file (every row's overrides are applied to its protocol, so a typo is one
    line naming the row, before anything runs)."""
    path = Path(path)
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read the rows file ({err.strerror})", where=where) from None
    except yaml.YAMLError as err:
        raise UserError(f"not valid YAML ({str(err).splitlines()[0]})", where=where) from None
    known = {"protocol", "seeds", "output_dir", "card", "chart", "records", "reference", "ranking",
             "full_protocol", "full_seeds", "rows"}
    if not isinstance(data, dict):
        raise UserError("must be a mapping with protocol and rows", where=where)
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}", where=where)
    for key in ("protocol", "output_dir", "card", "chart", "records"):
        if key in data and not isinstance(data[key], str):
            raise UserError("must be a path", where=where, field=key)
    if "protocol" not in data:
        raise UserError("missing: the ITR config every row starts from", where=where, field="protocol")
    rows = _rows(data.get("rows"), where)
    names = [r.name for r in rows]
    fr = Frontier(path, data["protocol"], rows,
                  **{k: data[k] for k in ("output_dir", "card", "chart", "records") if k in data})
    if "seeds" in data:
        fr.seeds = _ints(data["seeds"], where, "seeds")
    if "full_seeds" in data:
        fr.full_seeds = _ints(data["full_seeds"], where, "full_seeds")
    fr.reference = data.get("reference")
    if fr.reference is not None and fr.reference not in names:
        raise UserError(f"{fr.reference!r} is not a row", where=where, field="reference")
    fr.ranking = data.get("ranking") or []
    if not isinstance(fr.ranking, list) or any(n not in names for n in fr.ranking):
        raise UserError(f"must list row names, got {fr.ranking!r}", where=where, field="ranking")
    full = data.get("full_protocol")
    if full is not None:
        if not isinstance(full, dict) or not isinstance(full.get("config"), str) or set(full) - {"config", "set"}:
            raise UserError("must be {config: <ITR config>, set: [key=value, ...]}", where=where, field="full_protocol")
        fr.full_config, fr.full_overrides = full["config"], _strings(full.get("set"), where, "full_protocol.set")
    check_rows(fr)
    return fr


def _rows(value: Any, where: str) -> list[Row]:
    if not isinstance(value, list) or not value:
        raise UserError("must be a non-empty list of {name, set}", where=where, field="rows")
    rows, seen = [], set()
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"name", "set", "note"} or not isinstance(item.get("name"), str):
            raise UserError("must be {name: str, set: [key=value, ...], note: str}", where=where, field=f"rows[{i}]")
        name = item["name"]
        if not NAME.match(name) or name in seen:
            raise UserError(f"{name!r} is {'repeated' if name in seen else 'not a folder-safe name'}",
                            where=where, field=f"rows[{i}].name")
        seen.add(name)
        rows.append(Row(name, _strings(item.get("set"), where, f"rows[{i}].set"), str(item.get("note", ""))))
    return rows


def check_rows(fr: Frontier) -> None:
    """Every row's config resolves under its protocol(s): errors name the row and the override."""
    from mdpd_vl.tasks.itr import ITRConfig

    for protocol, extra, names in ((fr.protocol, [], [r.name for r in fr.rows]),
                                   (fr.full_config, fr.full_overrides, fr.ranking)):
        if protocol is None:
            continue
        for name in names:
            try:
                load_config(ITRConfig, protocol, [*extra, *fr.row(name).overrides])
            except UserError as err:
                raise UserError(f"row {name}: {err}", where=str(fr.path), field="rows") from None


def resolved(fr: Frontier, kind: str, row: Row) -> dict[str, Any]:
    """The row's ITR config under the research (`kind` research) or the full protocol, as a dict."""
    from mdpd_vl.engine.config import dump_config
    from mdpd_vl.tasks.itr import ITRConfig

    config, extra = (fr.protocol, []) if kind == "research" else (fr.full_config, fr.full_overrides)
    return dump_config(load_config(ITRConfig, config, [*extra, *row.overrides]))


# ----------------------------------------------------------------------------- runs
def run_dir(fr: Frontier, kind: str, row: str, seed: int | str) -> Path:
    """`<output_dir>/<research|full>/<row>/seed<S>`."""
    return Path(fr.output_dir) / kind / row / f"seed{seed}"


def run_argv(fr: Frontier, kind: str, row: Row, seed: int | str, data_root: str | None = None) -> list[str]:
    """The ITR recipe's arguments for one run (the seed seeds the data order, the init and the masks;
    a placeholder string gives the command as the card shows it, with `$S`)."""
    config, extra = (fr.protocol, []) if kind == "research" else (fr.full_config, fr.full_overrides)
    argv = ["--config", str(config), "--output-dir", str(run_dir(fr, kind, row.name, seed)),
            "--set", f"train.seed={seed}", "--set", f"method.distill.seed={seed}"]
    for item in [*extra, *row.overrides]:
        argv += ["--set", item]
    return argv + (["--data-root", data_root] if data_root else [])


def command(argv: list[str]) -> str:
    """The command line as results.json records it (`common.command_line`)."""
    return " ".join([f"python -m {ITR}", *(shlex.quote(a) for a in argv)])


def _without_data_root(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if "--data-root" in words:
        i = words.index("--data-root")
        del words[i:i + 2]
    return words


def run_config(fr: Frontier, kind: str, row: Row, seed: int) -> dict[str, Any]:
    """The ITR config one run resolves to (its argv's overrides in order), as a dict."""
    from mdpd_vl.engine.config import dump_config
    from mdpd_vl.tasks.itr import ITRConfig

    argv = run_argv(fr, kind, row, seed)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return dump_config(load_config(ITRConfig, argv[argv.index("--config") + 1], sets))


# where a run may differ from another machine's run of the same row without being another run
UNCOMPARED = (("output_dir",), ("data", "root"), ("data", "cache_dir"))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(config))
    for path in UNCOMPARED:
        node = out
        for key in path[:-1]:
            node = node.get(key) or {}
        node.pop(path[-1], None)
    return out


def same_run(done: dict[str, Any] | None, fr: Frontier, kind: str, row: Row, seed: int) -> bool:
    """`done` (a results.json or a record) was written by this row's run: the same command (the data root
    aside) and, where it holds its config, the same resolved config, so that an edit of the protocol file
    or of a default makes the run stale even though its command reads the same."""
    if done is None or (_without_data_root(str(done.get("command", "")))
                        != _without_data_root(command(run_argv(fr, kind, row, seed)))):
        return False
    held = done.get("config")
    if not isinstance(held, dict):
        return True
    # leaves present in both: a field added since (with its default) or removed does not make a run stale
    want, have = flatten(_comparable(run_config(fr, kind, row, seed))), flatten(_comparable(held))
    return all(want[k] == v for k, v in have.items() if k in want)



def finished(fr: Frontier, kind: str, row: Row, seed: int) -> bool:
    """The run folder holds a results.json of this very run (`same_run`)."""
    try:
        return same_run(report.load(run_dir(fr, kind, row.name, seed)), fr, kind, row, seed)
    except UserError:
        return False


# what the report reads from a run's results.json: kept in the record, the rest stays in the run folder
RECORD_KEYS = ("task", "dataset", "method", "backbone", "metrics", "metrics_side_kept", "train_seconds",
               "train_steps", "command")
RECORD_EFFICIENCY = ("trainable_params", "inference_params", "train_peak_bytes", "train_state_bytes",
                     "infer_qps", "infer_qps_bare")


def record_path(fr: Frontier, kind: str, row: str, seed: int | str) -> Path:
    """`<records>/<research|full>/<row>/seed<S>.json`."""
    return Path(fr.records) / kind / row / f"seed{seed}.json"


def compact(results: dict[str, Any], retimed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The part of a run's results.json that the report reads (a few KiB, unlike the run folder with its
    export and checkpoints), plus the re-timed latency where `--retime` wrote one."""
    rec = {k: results[k] for k in RECORD_KEYS if k in results}
    rec["efficiency"] = {k: v for k, v in (results.get("efficiency") or {}).items() if k in RECORD_EFFICIENCY}
    if isinstance(results.get("config"), dict):
        rec["config"] = _comparable(results["config"])
    if retimed:
        rec["latency_retimed"] = retimed
    return rec


def save_record(fr: Frontier, kind: str, row: Row, seed: int) -> bool:
    """Refresh the record of a finished run from its folder; False when the folder holds no finished run."""
    folder = run_dir(fr, kind, row.name, seed)
    if not finished(fr, kind, row, seed):
        return False
    rec = compact(report.load(folder), latency.load_latency(folder))  # type: ignore[arg-type]
    path = record_path(fr, kind, row.name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rec, indent=1, sort_keys=True) + "\n")
    return True


def load_record(fr: Frontier, kind: str, row: Row, seed: int) -> dict[str, Any] | None:
    """A finished run of this row and seed: its folder's results.json (the record refreshed from it), else
    the committed record where it was written by the same command; None when neither exists."""
    if save_record(fr, kind, row, seed):
        return json.loads(record_path(fr, kind, row.name, seed).read_text(encoding="utf-8"))
    path = record_path(fr, kind, row.name, seed)
    try:
        rec = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as err:
        raise UserError(f"unreadable record ({err})", where=str(path)) from None
    return rec if same_run(rec, fr, kind, row, seed) else None


def execute(fr: Frontier, kind: str, rows: list[Row], seeds: list[int], data_root: str | None,
            dry_run: bool = False) -> list[str]:
    """Run what is not finished, one process each; returns the failed runs (`row seedS`)."""
    todo = [(row, s) for row in rows for s in seeds]
    failed = []
    for i, (row, seed) in enumerate(todo, 1):
        folder, argv = run_dir(fr, kind, row.name, seed), run_argv(fr, kind, row, seed, data_root)
        tag = f"[{i}/{len(todo)}] {kind} {row.name} seed {seed}"
        if load_record(fr, kind, row, seed) is not None:
            print(f"{tag}: done already ({record_path(fr, kind, row.name, seed)})")
            continue
        if dry_run:
            print(f"{tag}: {command(argv)}")
            continue
        if folder.exists():  # unfinished or run with another command: start afresh (no stale resume)
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        with open(folder / "fading.log", "w", encoding="utf-8") as log:
            rc = subprocess.run([sys.executable, "-m", ITR, *argv], stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - t0
        if rc != 0 or report.load(folder) is None:
            failed.append(f"{row.name} seed{seed}")
            print(f"{tag}: FAILED (exit {rc}, {seconds:.0f} s): see {folder / 'fading.log'}")
            continue
        save_record(fr, kind, row, seed)
        rsum = report.load(folder)["metrics"]["rsum"]  # type: ignore[index]
        print(f"{tag}: Rsum {rsum} ({seconds:.0f} s)")
    return failed


def retime_all(fr: Frontier, rows: list[Row], seeds: list[int] | None, rounds: int = 9) -> None:
    """`latency.json` for every finished run of the selection (research, and full for the ranking rows)."""
    for kind, picked, kind_seeds in (("research", rows, seeds or fr.seeds),
                                     ("full", [r for r in rows if r.name in fr.ranking], seeds or fr.full_seeds)):
        # one seed per row is enough: the seeds deploy one architecture
        for row in picked:
            done = [s for s in kind_seeds if finished(fr, kind, row, s)]
            if done and not (report.load(run_dir(fr, kind, row.name, done[0])) or {}).get("export_dir"):
                print(f"{kind} {row.name}: the run exported no model (a side-kept method): not re-timed")
            elif done:  # the first finished seed
                rec = latency.retime(run_dir(fr, kind, row.name, done[0]), rounds=rounds)
                save_record(fr, kind, row, done[0])
                print(f"{kind} {row.name} seed {done[0]}: deployed / bare {rec['ratio']:.3f} "
                      f"({rec['deployed_s'] * 1e3:.1f} / {rec['bare_s'] * 1e3:.1f} ms, {rec['rounds']} rounds)")
            elif any(load_record(fr, kind, row, s) for s in kind_seeds):
                print(f"{kind} {row.name}: recorded only (no run folder with an export here): not re-timed")


# ----------------------------------------------------------------------------- report
def collect(fr: Frontier, kind: str, names: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Each row's summary over its finished seeds (a results.json of another command does not count)."""
    out = {}
    for name in names:
        row = fr.row(name)
        runs, retimed = [], None
        for seed in seeds:
            rec = load_record(fr, kind, row, seed)
            if rec is not None:
                runs.append(rec)
                retimed = retimed or rec.get("latency_retimed")
        if retimed:  # every seed deploys the same architecture: one re-timed seed stands for the row
            runs = [{**r, "latency_retimed": retimed} for r in runs]
        shown = command(run_argv(fr, kind, row, "SEEDVAR")).replace("SEEDVAR", "$S")  # quoted, then the variable
        out[name] = report.summarise(name, runs, shown, row.note, resolved(fr, kind, row))  # type: ignore[arg-type]
    return out


def write_report(fr: Frontier) -> Path:
    """The card block (table, target, ranking check, commands) and the chart, from the finished runs."""
    research = collect(fr, "research", [r.name for r in fr.rows], fr.seeds)
    rows = list(research.values())
    reference = research.get(fr.reference) if fr.reference else None
    if fr.ranking and fr.full_config:
        full = collect(fr, "full", fr.ranking, fr.full_seeds)
        ranking_lines = report.ranking(fr.ranking, research, full)
        commands = [f"- full protocol, `{n}`: `{full[n]['command']}`" for n in fr.ranking]
        ranking_lines = [*ranking_lines, "", *commands]
    else:
        ranking_lines = ["(the rows file names no ranking rows or no full_protocol)"]
    link = None
    if any(r["rsum"] and r["peak_gib"] for r in rows):  # no empty chart before the first run
        report.chart(fr.chart, rows, reference)
        link = report.relative_link(fr.chart, fr.card)
    text = report.block(rows, reference, ranking_lines, link, str(fr.path), fr.protocol, fr.seeds, fr.records)
    return report.update_card(fr.card, text)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.tasks.fading", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="configs/itr/frontier.yaml", help="the rows file (YAML)")
    p.add_argument("--only", help="comma-separated row names to run (the report shows every row)")
    p.add_argument("--seeds", help="comma-separated seeds instead of the file's")
    p.add_argument("--full", action="store_true", help="also run the ranking rows under the full protocol")
    p.add_argument("--report-only", action="store_true", help="train nothing: write the card and chart")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do")
    p.add_argument("--retime", action="store_true",
                   help="train nothing: re-time every finished run's export against its bare backbones (paired "
                        "rounds, one process; run on a quiet machine), then write the card")
    p.add_argument("--rounds", type=int, default=9, help="paired timing rounds per run of --retime (the median "
                   "ratio's noise falls with more; each round times one batch of 32 both ways)")
    p.add_argument("--data-root", help="passed to every run")
    p.add_argument("--output-dir", help="instead of the file's output_dir")
    p.add_argument("--card", help="instead of the file's card")
    p.add_argument("--chart", help="instead of the file's chart")
    return p.parse_args(argv)


def _pick(fr: Frontier, args: argparse.Namespace) -> tuple[list[Row], list[int] | None]:
    rows = fr.rows
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {r.name for r in fr.rows}]
        if unknown:
            raise UserError(f"no row named {', '.join(unknown)}", where="--only")
        rows = [r for r in fr.rows if r.name in names]
    seeds = None
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserError(f"must be comma-separated integers, got {args.seeds!r}", where="--seeds") from None
    return rows, seeds


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fr = load_frontier(args.rows)
    for key in ("output_dir", "card", "chart"):
        if getattr(args, key):
            setattr(fr, key, getattr(args, key))
    rows, seeds = _pick(fr, args)
    if args.full and fr.full_config is None:
        raise UserError("the rows file has no full_protocol", where="--full")
    failed: list[str] = []
    if args.retime:
        if args.rounds < 1:
            raise UserError(f"must be at least 1, got {args.rounds}", where="--rounds")
        retime_all(fr, rows, seeds, args.rounds)
    elif not args.report_only:
        failed += execute(fr, "research", rows, seeds or fr.seeds, args.data_root, args.dry_run)
        if args.full:
            ranked = [r for r in rows if r.name in fr.ranking]
            failed += execute(fr, "full", ranked, seeds or fr.full_seeds, args.data_root, args.dry_run)
    if args.dry_run:
        return 0
    card = write_report(fr)
    print(f"card: {card}\nchart: {fr.chart}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
