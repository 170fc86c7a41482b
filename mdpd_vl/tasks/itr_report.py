"""Tabulate finished ITR runs: `python -m mdpd_vl.tasks.itr_report RUN_DIR [RUN_DIR ...]`.

Reads each run's `results.json` (written by `python -m mdpd_vl.tasks.itr`) and prints one markdown
table, the run folder's name labelling each row, followed by the exact command of every row.
Nothing is measured here: every number comes from the run that wrote it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mdpd_vl.cards import markdown_table
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.tasks import kit


def load_run(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError("no readable results.json: the run did not finish", where=str(path)) from None
    except ValueError as err:
        raise UserError(f"not valid JSON ({err})", where=str(path)) from None


def row(label: str, r: dict[str, Any]) -> dict[str, Any]:
    """One table row (the kit's `--compare` row with ITR's headline metric, Rsum)."""
    return kit.compare_row(label, r, "rsum", "Rsum")


def plot(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Rsum of the deployed model against training memory, one labelled point per row."""
    kit.plot(path, rows, "Rsum", "Image-text retrieval: accuracy vs training memory (x: MDPD's side path)")


def report(folders: list[str]) -> str:
    """Markdown table + the command of each row."""
    runs = [(Path(f).name, load_run(f)) for f in folders]
    lines = [markdown_table([row(label, r) for label, r in runs]), "", "Commands:", ""]
    lines += [f"- `{label}`: `{r['command']}`" for label, r in runs]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.tasks.itr_report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders holding results.json")
    p.add_argument("--chart", help="also write a PNG: Rsum against training memory")
    args = p.parse_args(argv)
    print(report(args.runs))
    if args.chart:
        plot(args.chart, [row(Path(f).name, load_run(f)) for f in args.runs])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
