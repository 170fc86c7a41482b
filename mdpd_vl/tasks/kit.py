"""The task kit: what every task recipe produces after training, whatever its model is.

A recipe assembles backbone + method + head + data + evaluator and trains with the engine; it then
hands the kit a few small task-specific pieces (a training-step closure, timing callables, its
metrics, its deployed model) and the kit writes the same outputs for every task:
- `Timings`: wall and CPU seconds per phase of the run, printed at the end of every run;
- `efficiency`: parameter counts, the memory bill of one real training step (`train_peak_bytes`,
  `train_state_bytes`) and the throughput of the deployed model, the bare backbones and the
  side-kept model, timed interleaved in this process;
- `results`: the results.json record, one schema (`RESULT_KEYS`, `EFFICIENCY_KEYS`) for all tasks;
- `export`: the deployed model through `mdpd_vl.export.export_task` (a plain backbone + head per part);
- `write_card`: MODEL_CARD.md, whose "Use" snippet the recipe supplies (a test runs it);
- `compare_row` / `write_comparison` / `plot`: the `--compare` table, JSON and chart;
- `summary` + `locations`: the end-of-run text, ending with the time breakdown and where things are;
- `add_arguments` / `resolve_config` / `main`: the CLI every recipe shares (flags -> config keys with
  errors that name the flag typed, `--print-config`, path checks before any work, `--compare`
  validated in full before the first method trains).

Several processes (`torchrun` / `accelerate launch`, see `mdpd_vl.dist`): one writer. A recipe
creates its run folder with `output_dir`, builds shared artefacts that are not a feature cache (the
shapes world and `cached_features` are main-first already) inside `main_first`, and runs everything
after training through `on_main` (evaluation, efficiency timing, export, results.json, card,
summary): the main process does it while the others wait, and `show` prints on the main process
only. The engine trains as one process inside a section (a stage the main process runs alone). `export`, `write_card`,
`write_results`, `write_comparison` and `--print-config` write on the main process whoever calls
them. `results` records how many processes trained and their batches (`training`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdpd_vl import dist
from mdpd_vl.atomic import check_paths, write_text
from mdpd_vl.cards import markdown_table, write_model_card
from mdpd_vl.engine.config import (
    TrainConfig,
    add_config_arguments,
    atomic_write_text,
    config_to_yaml,
    load_config,
    parse_name_list,
)
from mdpd_vl.engine.memory import gib, measure_train_state
from mdpd_vl.engine.train import batch_facts
from mdpd_vl.errors import UserError
from mdpd_vl.tasks import common

RESULT_KEYS = ("task", "dataset", "split", "method", "backbone", "metrics", "metrics_side_kept",
               "metrics_before_training", "efficiency", "train_seconds", "training", "timings", "command",
               "config")
EFFICIENCY_KEYS = ("trainable_params", "inference_params", "train_peak_bytes", "train_state_bytes", "infer_qps",
                   "infer_qps_bare", "infer_qps_side_kept")


# ----------------------------------------------------------------------------- several processes
on_main = dist.on_main  # fn on the main process only; the others wait (and get None)
main_first = dist.main_first  # the block on the main process first (it writes), then on the others (they read)
show = dist.show  # print on the main process only
is_main = dist.is_main
all_gather = dist.all_gather_object  # every process's object, in rank order ([obj] in one process)


def output_dir(path: str | Path) -> Path:
    """The run folder, created (and proven writable) by the main process while the others wait."""
    dist.on_main(common.check_output_dir, path)
    return Path(path)


def training(config: Mapping[str, Any], train_result: Any = None) -> dict[str, Any]:
    """The `training` entry of results.json: processes, per-process batch (`batch_size` x
    `grad_accum`), global batch and the lr rule (`train.lr_scaling`), from the engine's result when
    given (with one weights digest per process), else from the config's `train` section."""
    if train_result is not None and getattr(train_result, "batch", None):
        facts = dict(train_result.batch)
    else:
        known = set(TrainConfig.__dataclass_fields__)
        facts = batch_facts(TrainConfig(**{k: v for k, v in (config.get("train") or {}).items() if k in known}))
    digests = list(getattr(train_result, "weights_digests", None) or [])
    if digests:
        facts["weights_in_sync"] = len(set(digests)) == 1
        facts["weights_digests"] = digests
    return facts


# ----------------------------------------------------------------------------- time breakdown
def _process_age() -> float | None:
    """Seconds since this process started (interpreter start-up and imports), where /proc tells."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass
class Timings:
    """Wall and process-CPU seconds per named phase; `startup` is the time before the recipe ran.

    CPU seconds count every thread of the process, so on a machine shared with other jobs they show
    the work a phase did even when its wall time was stretched by the others."""

    startup_s: float | None = field(default_factory=_process_age)
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block; a phase entered twice accumulates."""
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            entry = self.phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            entry["wall_s"] = round(entry["wall_s"] + time.perf_counter() - wall, 2)
            entry["cpu_s"] = round(entry["cpu_s"] + time.process_time() - cpu, 2)

    def record(self) -> dict[str, Any]:
        """The `timings` entry of results.json."""
        total = time.perf_counter() - self.started + (self.startup_s or 0.0)
        return {"startup_s": None if self.startup_s is None else round(self.startup_s, 2),
                "phases": {k: dict(v) for k, v in self.phases.items()}, "total_wall_s": round(total, 1),
                "threads": torch.get_num_threads()}


def timings_table(record: Mapping[str, Any]) -> str:
    """Phase | wall s | share of the wall time | CPU s, with the start-up (imports) first."""
    rows = []
    total = record["total_wall_s"] or 1.0
    if record.get("startup_s") is not None:
        rows.append({"phase": "start-up (interpreter, imports)", "wall s": record["startup_s"],
                     "share": f"{100 * record['startup_s'] / total:.0f}%", "CPU s": "-"})
    for name, t in record["phases"].items():
        rows.append({"phase": name, "wall s": t["wall_s"], "share": f"{100 * t['wall_s'] / total:.0f}%",
                     "CPU s": t["cpu_s"]})
    rows.append({"phase": "total", "wall s": record["total_wall_s"], "share": "100%", "CPU s": "-"})
    return markdown_table(rows)


# ----------------------------------------------------------------------------- the allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt(3) parameters (glibc malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc keep freed large blocks for reuse instead of handing them back to the kernel.

    A CPU training step allocates and frees the same large activations every step. glibc serves a
    block above its mmap threshold (at most 32 MiB by default) with a fresh mmap and unmaps it on
    free, so every step touches new zero-filled pages: about 0.5 M page faults (2 GB) and 1 s of
    system time per step of the embedded default, 15-20% of its CPU time (measured with
    getrusage; tasks/itr.md). Raising the mmap and trim thresholds and setting M_MMAP_MAX to 0 (mallopt) serves those
    blocks from the heap, where the next step reuses them. The process keeps up to its peak (it would
    reach it anyway). No-op where the C library is not glibc, or when the user set
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ themselves. Best effort: where glibc cannot grow the heap in place it may still mmap a block. Returns whether it
    applied."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in (
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return False
    # the thresholds alone are not enough: where the heap cannot grow in place, glibc still serves a big block
    # with mmap and unmaps it on free; M_MMAP_MAX 0 makes it extend the arena instead, which it keeps
    return all(bool(libc.mallopt(k, v)) for k, v in (
        (_M_MMAP_THRESHOLD, 2**31 - 1), (_M_TRIM_THRESHOLD, 2**30), (_M_MMAP_MAX, 0)))


# ----------------------------------------------------------------------------- efficiency
@dataclass
class TrainStep:
    """One real training step, for the memory bill: `closure()` runs the forward on `inputs` (the
    batch tensors, alive during the step) and returns the loss or a dict with "loss"."""

    model: nn.Module
    closure: Callable[[], Any]
    params: Sequence[nn.Parameter]
    inputs: Any
    batch_size: int


def efficiency(step: TrainStep, timed: Mapping[str, Callable[[], Any] | None], items: int, *,
               trainable_params: int, inference_params: int, inference_params_side_kept: int | None = None,
               rounds: int = 3) -> dict[str, Any]:
    """The efficiency block of results.json.

    `timed` maps `deployed`, `bare` (the untuned backbones' features: what fading must match) and
    `side_kept` (None unless the method has a side network to drop) to callables that each process
    `items` inputs; they are timed interleaved (`qps_interleaved`). The memory bill comes from one
    real step at lr 0 (`measure_train_state`), so the weights stay as they are; it runs after the
    evaluation and the export because a step may still move counters and running statistics."""
    opt = torch.optim.AdamW(list(step.params), lr=0.0)
    step.model.train()
    bill = measure_train_state(step.model, step.closure, step.params, opt, step.inputs)
    step.model.eval()
    qps = qps_interleaved({k: v for k, v in timed.items() if v is not None}, items, rounds)
    return {
        "trainable_params": trainable_params, "inference_params": inference_params,
        "inference_params_side_kept": inference_params_side_kept,
        "train_peak_bytes": bill.get("train_peak_bytes"), "train_state_bytes": bill["train_state_bytes"],
        "train_state_detail": bill, "measured_batch_size": step.batch_size,
        "infer_qps": qps["deployed"], "infer_qps_bare": qps.get("bare"), "infer_qps_side_kept": qps.get("side_kept"),
        "timed_items": items, "timing_rounds": rounds,
    }


@torch.no_grad()
def qps_interleaved(calls: Mapping[str, Callable[[], Any]], items: int, rounds: int = 3) -> dict[str, float]:
    """Items per second of each callable, timed in turn round after round (after one warm-up call
    each); each keeps its median. Load that drifts during the measurement hits all of them alike,
    so their ratios stay meaningful on a busy machine."""
    for fn in calls.values():
        fn()  # warm-up: first-call allocations, lazy initialisation
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(max(1, rounds)):
        for name, fn in calls.items():
            times[name].append(common.median_seconds(fn, repeats=1, warmup=0))
    return {name: round(items / statistics.median(ts), 2) for name, ts in times.items()}


def optimizer_groups(groups: Mapping[str, Sequence[nn.Parameter]], group_lr: Mapping[str, float] | None = None
                     ) -> list[dict[str, Any]]:
    """The engine's parameter groups from a model's named ones (`param_groups()`): a group whose name ends
    with a key of `group_lr` gets that learning rate (`backbone_norms: 1e-4`); empty groups are left out."""
    out = []
    for name, params in groups.items():
        if not params:
            continue
        lr = next((float(v) for suffix, v in (group_lr or {}).items() if name.endswith(suffix)), None)
        out.append({"name": name, "params": list(params), **({"lr": lr} if lr is not None else {})})
    return out


# ----------------------------------------------------------------------------- results, export, card
def results(*, task: str, dataset: str, split: str, method: str, backbone: str, metrics: dict[str, Any],
            metrics_side_kept: dict[str, Any] | None, metrics_before_training: dict[str, Any] | None,
            efficiency: dict[str, Any], train_seconds: float, timings: Timings, command: str,
            config: dict[str, Any], train_result: Any = None, **extra: Any) -> dict[str, Any]:
    """The results.json record: `RESULT_KEYS` in order, then the recipe's `extra` entries.
    `train_result` (the engine's `TrainResult`) fills `training` with what the engine ran."""
    record = {"task": task, "dataset": dataset, "split": split, "method": method, "backbone": backbone,
              "metrics": metrics, "metrics_side_kept": metrics_side_kept,
              "metrics_before_training": metrics_before_training, "efficiency": efficiency,
              "train_seconds": round(train_seconds, 1), "training": training(config, train_result),
              "timings": timings.record(), "command": command, "config": config}
    return {**record, **extra}


def write_results(out: Path, record: Mapping[str, Any]) -> Path:
    """`out/results.json` (atomic), written by the main process."""
    dist.on_main(common.write_json, out / "results.json", record)
    return out / "results.json"


def export(deployed: Any, folder: Path) -> Path | None:
    """Export the deployed task model when every part is a plain backbone + head, else None
    (side-kept networks and unmergeable adapters change the backbone: there is nothing to fade)."""
    from mdpd_vl.export import export_task

    if not deployed.exportable():
        return None
    dist.on_main(export_task, deployed, folder)  # one writer; the others get the same path
    return Path(folder)


def shown_path(path: str | Path) -> str:
    """`path` relative to the working folder when it lies inside it (cards read better), else absolute."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd())
    return rel if not rel.startswith("..") else str(Path(path).resolve())


def write_card(out: Path, results: Mapping[str, Any], *, title: str, task_words: str, deployed_summary: str,
               metrics_table: str, use_snippet: str, data: str, objective: str | None = None) -> Path:
    """MODEL_CARD.md of a run: the recipe's words and tables, the kit's efficiency table, written by
    the main process.

    `objective` states what the run optimised in words (`mdpd_vl.tuning.describe_objective`); by
    default the `objective` entry of `results`."""
    if objective is None:
        objective = results.get("objective") or \
            "Not stated by this recipe: the method and its settings are in results.json (`config.method`)."
    dist.on_main(_write_card, out, results, title=title, task_words=task_words, deployed_summary=deployed_summary,
                 metrics_table=metrics_table, use_snippet=use_snippet, data=data, objective=objective)
    return out / "MODEL_CARD.md"


def _write_card(out: Path, results: Mapping[str, Any], *, title: str, task_words: str, deployed_summary: str,
                metrics_table: str, use_snippet: str, data: str, objective: str) -> Path:
    eff = results["efficiency"]
    rows = [{"trainable params": eff["trainable_params"], "inference params": eff["inference_params"],
             "train peak": gib(eff["train_peak_bytes"]) if eff.get("train_peak_bytes") is not None else "-",
             "train_state_bytes": gib(eff["train_state_bytes"]), "infer QPS": eff["infer_qps"],
             "infer QPS bare": eff.get("infer_qps_bare") or "-",
             "infer QPS side kept": eff.get("infer_qps_side_kept") or "-"}]
    return write_model_card(out / "MODEL_CARD.md", {
        "title": title, "task": task_words, "method": results["method"], "deployed_summary": deployed_summary,
        "use_snippet": use_snippet, "objective": objective, "data": data, "dataset": results["dataset"],
        "split": results["split"],
        "metrics_table": metrics_table, "efficiency_table": markdown_table(rows),
        "device": "cuda" if torch.cuda.is_available() else "cpu", "command": results["command"],
        "config": results["config"]})


# ----------------------------------------------------------------------------- the end of a run
def headline(results: Mapping[str, Any]) -> str:
    """Trainable parameters, training memory (peak and state), training time, before-training metric."""
    eff = results["efficiency"]
    peak = eff.get("train_peak_bytes")
    mem = (f"training memory: peak {gib(peak)}, " if peak is not None else "training memory: ") + \
        f"train_state_bytes {gib(eff['train_state_bytes'])} (one step at batch {eff['measured_batch_size']})"
    return (f"{results['method']} on {results['dataset']} ({results['split']}): trainable "
            f"{eff['trainable_params'] / 1e6:.2f} M; {mem}; {results['train_seconds']} s training"
            + (f" on {_batches(results['training'])}" if results.get("training") else ""))


def _batches(t: Mapping[str, Any]) -> str:
    """`2 processes x batch 16 = global batch 32 (lr x1, lr_scaling none)`."""
    n = t["processes"]
    text = (f"{n} process{'es' if n != 1 else ''} x batch {t['per_process_batch']} = global batch "
            f"{t['global_batch']} (lr x{t['lr_factor']:g}, lr_scaling {t['lr_scaling']})")
    if t.get("weights_in_sync") is False:
        text += "; WARNING: the processes ended with different weights"
    return text


def dir_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when absent)."""
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def locations(run: Path, export_dir: Path | None, card: Path | None, cache: Path | None) -> list[tuple[str, str]]:
    """(what, where) lines of the summary: run folder, export, model card, feature cache + its size."""
    lines = [("run folder", f"{run}  (results.json, train/: metrics.jsonl, checkpoints)")]
    lines.append(("export", f"{export_dir}  (mdpd_vl.export.load_exported(\"{export_dir}\"))" if export_dir
                  else "(none: this method's deployed model is not a plain backbone + head)"))
    if card is not None:
        lines.append(("model card", str(card)))
    if cache is not None and cache.is_dir():
        lines.append(("feature cache", f"{cache}  ({_size(dir_bytes(cache))}; rebuilt when missing; delete with: "
                                       f"rm -r {cache})"))
    return lines


def summary(results: Mapping[str, Any], metrics_table: str, where: list[tuple[str, str]]) -> str:
    """The end-of-run text: headline, metrics table, time breakdown, where things are."""
    width = max(len(k) for k, _ in where)
    parts = [headline(results), metrics_table, "", "time breakdown (wall seconds; CPU seconds count every thread):",
             timings_table(results["timings"]), "", "where things are:"]
    parts += [f"  {k.ljust(width)}  {v}" for k, v in where]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- --compare
def compare_row(label: str, r: Mapping[str, Any], key: str = "rsum", name: str = "Rsum",
                columns: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One `--compare` / report row: the headline metric deployed and side kept, their ratio, memory,
    trainable parameters, training time (the training peak last: older results lack it), then the
    recipe's own `columns(r)` if given (e.g. `qps_columns`)."""
    eff, m, s = r["efficiency"], r["metrics"], r.get("metrics_side_kept") or {}
    side = s.get(key)
    d = r["config"]["method"].get("distill", {})
    peak = eff.get("train_peak_bytes")
    return {
        "run": label, "method": r["method"],
        "backbone trains": d.get("backbone_trainable", "-") if r["method"] == "mdpd" else "-",
        f"{name} deployed": m[key], f"{name} side kept": side if side is not None else "-",
        "deployed / side kept": round(m[key] / side, 3) if side else "-",
        "train state (GiB)": round(eff["train_state_bytes"] / 2**30, 3),
        "trainable (M)": round(eff["trainable_params"] / 1e6, 2), "train s": r["train_seconds"],
        "train peak (GiB)": round(peak / 2**30, 3) if peak is not None else "-",
        **(columns(r) if columns is not None else {}),
    }


def qps_columns(r: Mapping[str, Any]) -> dict[str, Any]:
    """Throughput of the deployed model and of the side-kept one (MDPD) as a share of the bare
    backbones', each timed interleaved with them in the run's own process (so comparable across
    runs on a busy machine, unlike raw QPS)."""
    eff = r["efficiency"]
    bare = eff.get("infer_qps_bare")

    def share(qps: Any) -> Any:
        return round(qps / bare, 3) if qps and bare else "-"

    return {"QPS / bare": share(eff.get("infer_qps")), "side kept QPS / bare": share(eff.get("infer_qps_side_kept"))}


# Methods whose backbone never changes in training (linear probe, side-kept networks, head-only MDPD):
# with the frozen parts in eval mode one pass gives the features every epoch would compute.
FROZEN_EXACT = ("linear", "unipt", "sherl", "lst")


def frozen_features_exact(method: Any) -> bool:
    """Per-layer backbone features computed once are exactly what training would compute for this
    `MethodConfig`: the backbone never changes and runs in eval mode (`bn_eval` keeps dropout on)."""
    frozen = method.name in FROZEN_EXACT or (method.name == "mdpd" and method.distill.backbone_trainable == "head")
    return frozen and method.backbone_mode == "eval"


def plot(path: str | Path, rows: list[dict[str, Any]], name: str = "Rsum", title: str = "") -> None:
    """The deployed model's headline metric against training memory (the peak where measured), one
    labelled point per row; the dropped side path as a grey cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = all(isinstance(r["train peak (GiB)"], (int, float)) for r in rows)
    xkey = "train peak (GiB)" if peak else "train state (GiB)"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for r in rows:
        x, y = r[xkey], r[f"{name} deployed"]
        ax.scatter(x, y, s=40, color="tab:red" if r["method"] == "mdpd" else "tab:blue")
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if isinstance(r[f"{name} side kept"], (int, float)):
            ax.scatter(x, r[f"{name} side kept"], s=30, marker="x", color="tab:gray")
    ax.set_xscale("log")
    ax.set_xlabel(f"training memory: {'peak live bytes' if peak else 'train_state_bytes'} of one step (GiB, log)")
    ax.set_ylabel(f"{name} of the deployed model")
    ax.set_title(title or f"{name} vs training memory (x: MDPD's side path)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(folder: Path, runs: list[Mapping[str, Any]], command: str, key: str = "rsum",
                     name: str = "Rsum", columns: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None, *,
                     labels: Sequence[str] | None = None, notes: str = "") -> str:
    """compare.md (one table for all methods), compare.json and compare.png, written by the main
    process (which alone holds `runs`: `on_main` returned None elsewhere); returns the table text there,
    "" on the others.

    `labels` name the rows (default: each run's method), `columns(run)` adds a recipe's columns to its
    row, `notes` (markdown) follows the table."""
    return dist.on_main(_write_comparison, folder, runs, command, key, name, columns, labels, notes) or ""


def _write_comparison(folder: Path, runs: list[Mapping[str, Any]], command: str, key: str, name: str,
                      columns: Callable[[Mapping[str, Any]], dict[str, Any]] | None,
                      labels: Sequence[str] | None, notes: str) -> str:
    names = list(labels) if labels is not None else [r["method"] for r in runs]
    table = [compare_row(label, r, key, name, columns) for label, r in zip(names, runs)]
    text = f"Measured by:\n\n```\n{command}\n```\n\n" + markdown_table(table) + "\n" + (f"\n{notes}\n" if notes else "")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "compare.md", text)
    common.write_json(folder / "compare.json", {"command": command, "rows": table})
    plot(folder / "compare.png", table, name)
    return text


def gains_table(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], key: str = "rsum", name: str = "Rsum") -> str:
    """MDPD's deployed (faded) model against each side-kept method of a comparison: the headline metric
    and the throughput, each run's QPS taken relative to the bare model timed interleaved with it in its
    own process (which cancels the load of the machine at the time). Empty without both kinds of run."""
    side = [(lab, r) for lab, r in zip(labels, runs) if r["method"] in ("unipt", "sherl", "lst")]
    ours = [(lab, r) for lab, r in zip(labels, runs) if r["method"] == "mdpd"]

    def speed(r: Mapping[str, Any]) -> float | None:
        eff = r["efficiency"]
        return eff["infer_qps"] / eff["infer_qps_bare"] if eff.get("infer_qps") and eff.get("infer_qps_bare") else None

    rows = []
    for lab, r in ours:
        for slab, s in side:
            mine, theirs = speed(r), speed(s)
            rows.append({"MDPD run": lab, "vs side kept": slab, f"{name} (MDPD faded)": r["metrics"][key],
                         f"{name} (side kept)": s["metrics"][key],
                         "gain": round(r["metrics"][key] - s["metrics"][key], 2),
                         "QPS / bare (MDPD)": round(mine, 3) if mine else "-",
                         "QPS / bare (side kept)": round(theirs, 3) if theirs else "-",
                         "QPS gain": f"{100 * (mine / theirs - 1):+.1f}%" if mine and theirs else "-"})
    return "MDPD (faded) against each side-kept method:\n\n" + markdown_table(rows) if rows else ""


def compare_folder(label: str) -> str:
    """The run folder name of one `--compare` entry (`mdpd:norms_all+ckpt` -> `mdpd_norms_all_ckpt`)."""
    return label.replace(":", "_").replace("+", "_")


def compare_entry(method: Any, entry: str) -> Any:
    """The method config of one `--compare` entry: a method name, or `mdpd:<backbone_trainable>` with an
    optional `+ckpt` (activation checkpointing), e.g. `mdpd:norms_all+ckpt`, so that MDPD's settings of
    the backbone's trainable tensors are rows of one comparison."""
    name, _, variant = entry.partition(":")
    out = replace(method, name=name)
    if not variant:
        return out
    if name != "mdpd":
        raise UserError(f"only mdpd takes a variant (mdpd:head, mdpd:norms_all+ckpt), got {entry!r}")
    trainable, _, flag = variant.partition("+")
    if flag not in ("", "ckpt"):
        raise UserError(f"unknown variant flag {flag!r} in {entry!r}; valid: +ckpt")
    out.distill = replace(method.distill, backbone_trainable=trainable, checkpointing=flag == "ckpt")  # validated
    return out


# ----------------------------------------------------------------------------- the CLI every recipe shares
# The options every recipe has, as argparse dest -> config key; a recipe adds its own (`--dataset`,
# `--data-root`, ...) to the same mapping.
COMMON_FLAGS = {"backbone": "backbone", "pretrained": "pretrained", "method": "method.name",
                "output_dir": "output_dir"}


def add_arguments(parser: argparse.ArgumentParser, methods: str) -> None:
    """The shared options: `--backbone`, `--pretrained`, `--method` (`methods` is its help),
    `--output-dir`, `--compare`, `--print-config`, `--config FILE`, `--set KEY=VALUE`."""
    parser.add_argument("--backbone")
    parser.add_argument("--pretrained")
    parser.add_argument("--method", help=methods)
    parser.add_argument("--output-dir")
    parser.add_argument("--compare", help="comma-separated methods run on identical data and seeds")
    parser.add_argument("--print-config", metavar="FILE",
                        help="write the resolved config as YAML to FILE ('-': standard output) and exit")
    add_config_arguments(parser)  # --config FILE, --set a.b=c


def user_labels(args: argparse.Namespace, flags: Mapping[str, str]) -> dict[str, str]:
    """Config key -> the option the user typed for it (`--method nonsense`, `--set train.lr=1`)."""
    return {**common.flag_overrides(args, flags)[1], **common.set_labels(args.overrides)}


def resolve_config(cls: type, args: argparse.Namespace, flags: Mapping[str, str], preset: Sequence[str] = ()) -> Any:
    """Defaults < `preset` (ignored with `--config`) < `--config` file < flags < `--set`; a bad value
    is one UserError naming the option the user typed, never a generated `--set`."""
    overrides, _ = common.flag_overrides(args, flags)
    try:
        return load_config(cls, args.config, [*([] if args.config else preset), *overrides, *args.overrides])
    except UserError as err:
        raise common.relabel(err, user_labels(args, flags)) from None


def main(args: argparse.Namespace, cfg: Any, run: Callable[[Any, str, Path | None], Mapping[str, Any]], *,
         module: str, flags: Mapping[str, str], argv: Sequence[str] | None = None,
         in_dirs: Mapping[str, Any] | None = None, metric: tuple[str, str] = ("rsum", "Rsum"),
         columns: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
         notes: Callable[..., str] | None = None) -> int:
    """Run a recipe from its parsed options: `--print-config`, else the paths checked (`in_dirs`: the
    folders it reads, `{flag: path}`), then one `run(cfg, command, None)` or, with `--compare`,
    one `run(cfg_m, command, output_dir/m)` per method (every name checked first) and the comparison table +
    chart on `metric` (results key, display name), followed by `notes(runs, labels, *metric)` when given
    (e.g. `gains_table`). Errors raised later still name the option typed."""
    command = common.command_line(argv, module)
    keep_freed_memory()  # a CLI process: CPU training steps stop page-faulting their activations
    try:
        if args.print_config == "-":  # the usual spelling of standard output, not a file named "-"
            on_main(lambda: print(config_to_yaml(cfg, f"python -m {module} --config FILE"), end=""))
            return 0
        if args.print_config:
            check_paths(out_files={"--print-config": args.print_config})
            on_main(atomic_write_text, args.print_config,
                    config_to_yaml(cfg, f"python -m {module} --config {args.print_config}"))
            return 0
        check_paths(out_dirs={"--output-dir": cfg.output_dir}, in_dirs=in_dirs)
        if not args.compare:
            run(cfg, command, None)
            return 0
        methods = parse_name_list(args.compare, "--compare", lambda e: (e, compare_entry(cfg.method, e)))
        runs = []
        for label, method in methods:
            one = copy.deepcopy(cfg)
            one.method = copy.deepcopy(method)
            runs.append(run(one, command, Path(cfg.output_dir) / compare_folder(label)))
        labels = [label for label, _ in methods]
        show(on_main(lambda: write_comparison(  # the main process alone holds the runs (None elsewhere)
            Path(cfg.output_dir), runs, command, *metric, columns=columns, labels=labels,
            notes=notes(runs, labels, *metric) if notes is not None else "")) or "")
        return 0
    except UserError as err:  # said in the user's words: the option they typed, not a config key
        raise common.relabel(err, user_labels(args, flags)) from None
