"""The fading frontier's report, from finished ITR runs only: per-row mean +- spread over seeds, the
issue-16 target check against a reference row (LoRA), the ranking check of the research protocol
against the full one, the frontier chart and the card block. Nothing is measured here.

Definitions (every number from a run's results.json):
- deployed Rsum: `metrics.rsum`; side kept: `metrics_side_kept.rsum` (MDPD only);
- training memory: `efficiency.train_peak_bytes` (peak live bytes of one training step, at the
  efficiency batch), `train_state_bytes` where an older run lacks the peak;
- step time: `train_seconds / train_steps` (the whole training loop, data included);
- deployed latency / bare: the median paired ratio of `latency.json` where `--retime` wrote one
  (`fading_latency.py`: every export re-timed in one quiet process), else `infer_qps_bare / infer_qps`,
  timed interleaved in the run's own process (`bare` = the untuned backbones' features, so a head's own
  cost counts against the model);
- FLOPs / bare: `flops_ratio` of `latency.json` (one batch both ways, counted by torch's flop counter);
  "bare cost" (<= 1.02 x) is judged on it where counted, else on the latency ratio.
Spread = sample standard deviation over the seeds (0 for one seed).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mdpd_vl.cards import markdown_table
from mdpd_vl.engine.config import atomic_write_text
from mdpd_vl.errors import UserError

LATENCY_BOUND = 1.02  # issue 16: a deployed model "costs the bare backbone" within 2%
MEMORY_SHARE, ACCURACY_SHARE = 0.4, 0.95  # the target: <= 0.4 x the reference's memory, >= 0.95 x its Rsum
BEGIN, END = "<!-- fading -->", "<!-- /fading -->"


def load(folder: str | Path) -> dict[str, Any] | None:
    """A run's results.json, or None when the run has not finished."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"unreadable results ({err})", where=str(path)) from None


def _stats(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(name: str, runs: Sequence[Mapping[str, Any]], command: str, note: str = "",
              config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One row over its finished seeds (`runs`); the stats are None where no seed finished. `config` (the
    row's resolved ITR config as a dict) names the method before any run has finished."""
    def each(fn: Any) -> list[float]:
        out = []
        for r in runs:
            value = fn(r)
            if isinstance(value, (int, float)):
                out.append(float(value))
        return out

    def peak(r: Mapping[str, Any]) -> Any:
        eff = r["efficiency"]
        value = eff.get("train_peak_bytes") or eff.get("train_state_bytes")
        return value / 2**30 if value else None

    def latency(r: Mapping[str, Any]) -> Any:
        if (r.get("latency_retimed") or {}).get("ratio"):  # `--retime`: paired rounds in one quiet process
            return r["latency_retimed"]["ratio"]
        eff = r["efficiency"]
        return eff["infer_qps_bare"] / eff["infer_qps"] if eff.get("infer_qps") and eff.get("infer_qps_bare") else None

    method_cfg = dict(((runs[0].get("config") if runs else None) or config or {}).get("method") or {})
    method = runs[0].get("method") if runs else method_cfg.get("name", "-")
    distill = method_cfg.get("distill") or {}
    trains = distill.get("backbone_trainable", "-")
    if distill.get("checkpointing") not in (None, False, "none"):
        trains += f" +ckpt {'all' if distill['checkpointing'] is True else distill['checkpointing']}"
    hl = distill.get("head_layers")
    if isinstance(hl, dict):
        trains += ", W_B reads " + ", ".join(f"{spec} ({tower})" for tower, spec in hl.items())
    elif hl not in (None, "last"):
        trains += f", W_B reads {hl}"
    return {
        "name": name, "note": note, "command": command, "seeds": len(runs), "method": method,
        "backbone trains": trains if method == "mdpd" else "-",
        "rsum": _stats(each(lambda r: r["metrics"]["rsum"])),
        "side": _stats(each(lambda r: (r.get("metrics_side_kept") or {}).get("rsum"))),
        "peak_gib": _stats(each(peak)),
        "step_s": _stats(each(lambda r: r["train_seconds"] / r["train_steps"] if r.get("train_steps") else None)),
        "latency": _stats(each(latency)),
        "flops": _stats(each(lambda r: (r.get("latency_retimed") or {}).get("flops_ratio"))),
        "trainable_m": _stats(each(lambda r: r["efficiency"]["trainable_params"] / 1e6)),
    }


def _pm(stat: tuple[float, float] | None, digits: int = 1) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def _mean(stat: tuple[float, float] | None, digits: int = 2) -> str:
    return "-" if stat is None else f"{stat[0]:.{digits}f}"


def bare_cost(row: Mapping[str, Any]) -> bool | None:
    """The deployed model costs the bare backbones: its FLOPs ratio <= 1.02 where `--retime` counted it
    (timings on a shared CPU swing by more than 2%), else its latency ratio; None if neither was measured."""
    measured = row.get("flops") or row["latency"]
    return None if measured is None else measured[0] <= LATENCY_BOUND


def table(rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None) -> str:
    """The frontier table: one line per row, mean ± spread over its finished seeds."""
    ref_rsum = reference["rsum"][0] if reference and reference["rsum"] else None
    ref_mem = reference["peak_gib"][0] if reference and reference["peak_gib"] else None
    lines = []
    for r in rows:
        cost = bare_cost(r)
        lines.append({
            "row": r["name"], "method": r["method"], "backbone trains": r["backbone trains"], "seeds": r["seeds"],
            "Rsum deployed": _pm(r["rsum"]), "Rsum side kept": _pm(r["side"]),
            "train peak (GiB)": _mean(r["peak_gib"], 3), "step (s)": _mean(r["step_s"], 2),
            "latency / bare": _mean(r["latency"], 3), "FLOPs / bare": _mean(r.get("flops"), 4),
            "bare cost": "-" if cost is None else "yes" if cost else "no",
            "Rsum / ref": f"{r['rsum'][0] / ref_rsum:.3f}" if ref_rsum and r["rsum"] else "-",
            "memory / ref": f"{r['peak_gib'][0] / ref_mem:.3f}" if ref_mem and r["peak_gib"] else "-",
            "trainable (M)": _mean(r["trainable_m"], 2),
        })
    return markdown_table(lines)


def _best(pool: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The highest mean deployed Rsum; on a tie (a checkpointed row repeats its row's numbers), the lower peak."""
    return max(pool, key=lambda r: (r["rsum"][0], -r["peak_gib"][0]))


def target(rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None) -> list[str]:
    """The issue-16 target against the reference row, in words (met, or the best measured values)."""
    if reference is None or reference["rsum"] is None or reference["peak_gib"] is None:
        return ["Target check: the reference row has no finished run yet."]
    ref_rsum, ref_mem = reference["rsum"][0], reference["peak_gib"][0]
    done = [r for r in rows if r["method"] == "mdpd" and r["rsum"] and r["peak_gib"]]
    ok = [r for r in done if bare_cost(r) and r["peak_gib"][0] <= MEMORY_SHARE * ref_mem
          and r["rsum"][0] >= ACCURACY_SHARE * ref_rsum]
    head = (f"Target (MDPD, deployed cost <= {LATENCY_BOUND} x bare, peak memory <= {MEMORY_SHARE} x "
            f"`{reference['name']}`'s {ref_mem:.3f} GiB, deployed Rsum >= {ACCURACY_SHARE} x its {ref_rsum:.1f}): ")
    if ok:
        best = _best(ok)
        names = ", ".join(f"`{r['name']}`" for r in ok)
        out = [head + f"**met** by {names}; best `{best['name']}` "
               f"(Rsum {_pm(best['rsum'])}, {best['peak_gib'][0] / ref_mem:.2f} x the memory)."]
    else:
        cheap = [r for r in done if bare_cost(r) and r["peak_gib"][0] <= MEMORY_SHARE * ref_mem]
        best = _best(cheap) if cheap else None
        out = [head + "**missed**" + (f"; best within the memory and latency bounds: `{best['name']}`, Rsum "
                                      f"{_pm(best['rsum'])} = {best['rsum'][0] / ref_rsum:.3f} x the reference."
                                      if best else "; no MDPD row within the memory and latency bounds.")]
    below = [r for r in rows if r["name"] != reference["name"] and r["rsum"] and r["peak_gib"]
             and r["peak_gib"][0] < ref_mem]
    for kind, pool in (("deployed at the bare backbones' cost", [r for r in below if bare_cost(r)]),
                       ("at any inference cost", below)):
        if pool:
            best = _best(pool)
            lat = f", latency {best['latency'][0]:.3f} x bare" if best["latency"] else ""
            lat += f", FLOPs {best['flops'][0]:.4f} x bare" if best.get("flops") else ""
            out.append(f"Best deployed Rsum at any memory below `{reference['name']}`'s, {kind}: `{best['name']}`, "
                       f"{_pm(best['rsum'])} at {best['peak_gib'][0]:.3f} GiB{lat}.")
    return out


def ranking(names: Sequence[str], research: Mapping[str, Any], full: Mapping[str, Any]) -> list[str]:
    """Do the research and the full protocol rank `names` alike (deployed Rsum means)? Kendall tau and
    the exact order; says what is missing when either protocol lacks a row."""
    missing = [f"{n} ({'research' if not (research.get(n) or {}).get('rsum') else 'full'})" for n in names
               if not (research.get(n) or {}).get("rsum") or not (full.get(n) or {}).get("rsum")]
    if missing:
        return [f"Ranking check of {', '.join(names)}: not yet, missing {', '.join(missing)} "
                "(`python -m mdpd_vl.tasks.fading --full` runs the full protocol's rows)."]
    from scipy.stats import kendalltau

    a = [research[n]["rsum"][0] for n in names]
    b = [full[n]["rsum"][0] for n in names]
    tau = kendalltau(a, b).statistic
    order_r = sorted(names, key=lambda n: -research[n]["rsum"][0])
    order_f = sorted(names, key=lambda n: -full[n]["rsum"][0])
    rows = [{"row": n, "research Rsum": _pm(research[n]["rsum"]), "full Rsum": _pm(full[n]["rsum"]),
             "research rank": order_r.index(n) + 1, "full rank": order_f.index(n) + 1} for n in names]
    verdict = "the same order" if order_r == order_f else "a different order"
    return [markdown_table(rows), "",
            f"Kendall tau = {tau:.3f}; {verdict} (research: {' > '.join(order_r)}; full: {' > '.join(order_f)})."]


def frontier_names(rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """The bare-cost MDPD rows that no bare-cost MDPD row with at most their peak memory beats on Rsum."""
    pool = sorted((r for r in rows if r["method"] == "mdpd" and r["rsum"] and r["peak_gib"] and bare_cost(r)),
                  key=lambda r: (r["peak_gib"][0], -r["rsum"][0]))
    out, best = set(), float("-inf")
    for r in pool:  # by rising memory: a row is on the front when it beats every cheaper one
        if r["rsum"][0] > best:
            out.add(r["name"])
            best = r["rsum"][0]
    return out


def chart(path: str | Path, rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None = None) -> None:
    """Deployed Rsum (mean, bar = spread) against peak training memory (log); marker area grows with the
    step time; filled = deployed cost <= 1.02 x bare (`bare_cost`), hollow otherwise; MDPD red, baselines blue;
    named: the baselines and `frontier_names`, the other rows faint (all of them are in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["rsum"] and r["peak_gib"]]
    named = {r["name"] for r in done if r["method"] != "mdpd"} | frontier_names(done)
    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    longest = max((r["step_s"][0] for r in done if r["step_s"]), default=1.0) or 1.0
    for r in done:
        x, (y, spread) = r["peak_gib"][0], r["rsum"]
        colour = "tab:red" if r["method"] == "mdpd" else "tab:blue"
        alpha = 1.0 if r["name"] in named else 0.3  # the rest: in the table, drawn faint and unlabelled
        size = 30 + 370 * ((r["step_s"][0] if r["step_s"] else 0.0) / longest)
        ax.errorbar(x, y, yerr=spread, fmt="none", ecolor=colour, alpha=0.5 * alpha, capsize=2)
        ax.scatter(x, y, s=size, edgecolors=colour, facecolors=colour if bare_cost(r) else "none", linewidths=1.4,
                   alpha=alpha)
        if r["name"] in named:
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    if reference and reference["rsum"] and reference["peak_gib"]:
        ax.axvline(MEMORY_SHARE * reference["peak_gib"][0], color="gray", ls="--", lw=0.8,
                   label=f"{MEMORY_SHARE} x {reference['name']}'s memory")
        ax.axhline(ACCURACY_SHARE * reference["rsum"][0], color="gray", ls=":", lw=0.8,
                   label=f"{ACCURACY_SHARE} x {reference['name']}'s Rsum")
        ax.legend(fontsize=7, loc="best")
    if done:
        ax.set_xscale("log")
    ax.set_xlabel("peak training memory of one step (GiB, log)")
    ax.set_ylabel("deployed Rsum (mean over seeds)")
    ax.set_title("Fading frontier: filled = deployed cost <= 1.02 x bare (FLOPs where counted, else latency); "
                 "area = step time\nnamed: the baselines and the bare-cost MDPD rows no cheaper row beats; "
                 "faint: the table's other rows", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def block(rows: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] | None, ranking_lines: Sequence[str],
          chart_link: str | None, rows_file: str, protocol: str, seeds: Sequence[int], records: str = "") -> str:
    """The generated part of the card: table, target, ranking check, chart, every command."""
    kept = f" (kept as `{records}/<research|full>/<row>/seed<S>.json`)" if records else ""
    lines = [BEGIN, f"Generated by `python -m mdpd_vl.tasks.fading --rows {rows_file}` from the runs' records{kept} "
             f"(protocol `{protocol}`, seeds {', '.join(map(str, seeds))}); mean ± spread (sample standard "
             "deviation) over the finished seeds. \"latency / bare\": the deployed towers against the bare "
             "backbones' features: re-timed from the exports with paired rounds in one process "
             "(`--retime`, `latency.json`) where that ran, else as each run timed it in its own process. "
             "\"FLOPs / bare\": the same comparison in floating-point operations of one batch (`--retime`). "
             "\"bare cost\": within 1.02 x, judged on the FLOPs where counted (the timed ratio of architecturally "
             "identical models swings by a few percent on a shared CPU), else on the timed ratio.", "",
             table(rows, reference), "", *[f"- {t}" for t in target(rows, reference)], "",
             "Ranking check (research protocol against the full one):", "", *ranking_lines, "",
             f"![deployed Rsum against peak training memory]({chart_link})" if chart_link else
             "(no chart: no run has finished yet)", "", "Commands (`$S` = the seed: `for S in 0 1 2; do ...; done`):", ""]
    for r in rows:
        note = f" — {r['note']}" if r["note"] else ""
        lines.append(f"- `{r['name']}`{note}: `{r['command']}`")
    return "\n".join([*lines, END])


HEADER = """# The fading frontier (issue 16)

Which configuration gets the side network's accuracy into a deployed model that costs the bare
backbones at inference, and at what training memory. Protocol: the research ITR setting
(`configs/itr/research.yaml`: the shapes world at fewer pairs, smaller images and fewer steps than
tasks/itr.md), every row for each seed; the rows and their overrides are in `configs/itr/frontier.yaml`.
Run under the shared CPU lock:

```bash
nice -n 5 env OMP_NUM_THREADS=2 python -m mdpd_vl.tasks.fading          # research rows x seeds
nice -n 5 env OMP_NUM_THREADS=2 python -m mdpd_vl.tasks.fading --full   # + the ranking rows, full protocol
python -m mdpd_vl.tasks.fading --report-only                                                     # the card and chart only
```

Finished runs are skipped: each leaves a small record beside the card (its folder is not kept in git), so a
fresh clone rebuilds the card and reruns only what is missing; delete a record to rerun it. The block below
is rewritten by every call, the text outside it is kept.

"""

FOOTER = """

## Defaults chosen

Not chosen yet: a default per task and dataset is picked from the measured frontier above, with the reason.
"""


def update_card(path: str | Path, generated: str) -> Path:
    """Replace the generated block of the card (the rest is kept); a new card gets a header and footer."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if BEGIN in text and END in text:
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        text = text[:start] + generated + text[stop:]
    else:
        text = HEADER + generated + FOOTER
    atomic_write_text(path, text)
    return path


def relative_link(target_path: str | Path, card: str | Path) -> str:
    """`target_path` as a link from the card's folder."""
    return os.path.relpath(Path(target_path).resolve(), Path(card).resolve().parent)
