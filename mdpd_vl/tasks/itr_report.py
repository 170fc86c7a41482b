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


def load_run(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "results.json"
    try:
        return json.loads(path.read_text())
    except OSError:
        raise UserError("no readable results.json: the run did not finish", where=str(path)) from None
    except ValueError as err:
        raise UserError(f"not valid JSON ({err})", where=str(path)) from None


def row(label: str, r: dict[str, Any]) -> dict[str, Any]:
    """One table row: deployed and side-kept Rsum, their ratio, memory, params, time."""
    eff, m, s = r["efficiency"], r["metrics"], r.get("metrics_side_kept") or {}
    side = s.get("rsum")
    d = r["config"]["method"].get("distill", {})
    return {
        "run": label, "method": r["method"],
        "backbone trains": d.get("backbone_trainable", "-") if r["method"] == "mdpd" else "-",
        "Rsum deployed": m["rsum"], "Rsum side kept": side if side is not None else "-",
        "deployed / side kept": round(m["rsum"] / side, 3) if side else "-",
        "train mem (GiB)": round(eff["train_state_bytes"] / 2**30, 3),
        "trainable (M)": round(eff["trainable_params"] / 1e6, 2), "train s": r["train_seconds"],
    }


def plot(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Scatter of the deployed model's Rsum against training memory, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r in rows:
        x, y = r["train mem (GiB)"], r["Rsum deployed"]
        ax.scatter(x, y, s=40, color="tab:red" if r["method"] == "mdpd" else "tab:blue")
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if isinstance(r["Rsum side kept"], (int, float)):  # MDPD: the side path it dropped
            ax.scatter(x, r["Rsum side kept"], s=30, marker="x", color="tab:gray")
    ax.set_xscale("log")
    ax.set_xlabel("training memory: train_state_bytes (GiB, log scale)")
    ax.set_ylabel("Rsum of the deployed model (max 600)")
    ax.set_title("Image-text retrieval: accuracy vs training memory (x: MDPD's side path)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
