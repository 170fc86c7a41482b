"""`python -m mdpd_vl.bench`: the paper's Params / Memory / QPS columns as one command.

Every method (and every mdpd `backbone_trainable` setting) runs in a fresh process on a synthetic
classification task, so one row's allocator state can never leak into the next. This module plans
the rows, launches the workers (`bench_worker.py`), and writes the JSON, the markdown table with the
issue's four target checks, and the PNG charts.

    python -m mdpd_vl.bench --backbone ViT-B-32 --batch-size 32 --json bench.json
    python -m mdpd_vl.bench --quick                     # tiny ViT, all methods, < 2 min on 2 CPU cores
    python -m mdpd_vl.bench --quick --scaling batch     # + memory against batch size
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mdpd_vl import bench_worker
from mdpd_vl.bench_plots import plot_bars, plot_scaling
from mdpd_vl.bench_worker import RESULT_KEYS, Launcher

__all__ = ["METHODS", "MDPD_VARIANTS", "RESULT_KEYS", "check_targets", "main", "markdown", "plan_rows"]
from mdpd_vl.errors import UserError, cli_entry

METHODS = ("none", "linear", "full", "partial", "bitfit", "lora", "adalora", "ia3", "adapter", "unipt", "sherl",
           "lst", "mdpd")
SIDE_KEPT = ("unipt", "sherl", "lst")
# mdpd's training bill depends on what trains on the backbone; checkpointing is pointless for `head`
# (nothing is backpropagated through the backbone), so it only pairs with the norm settings.
# A variant is `<backbone_trainable>[+ckpt[=<granularity>]][+alt]`: +ckpt alone = the recommended
# granularity (`distill.config.RECOMMENDED_CHECKPOINTING`), +ckpt=all|every_<k>|sqrt names one;
# +alt: schedule alternate, both phases timed.
MDPD_VARIANTS = ("head", "norms_last_k", "norms_last_k+ckpt", "norms_all", "norms_all+ckpt")
TRAINABLE = ("head", "norms_last_k", "norms_all")
FLAGS = ("ckpt", "alt")
REFERENCE_MDPD = "mdpd[head]"
NORMS_MDPD = "mdpd[norms_all+ckpt]"
GIB = 1024**3


# -- planning ----------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan_rows(methods: list[str], variants: list[str], last_k: int | None = None) -> list[dict[str, Any]]:
    """One row per method; mdpd expands into one row per `backbone_trainable` variant."""
    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown method {m!r}; valid: {', '.join(METHODS)}", field="--methods")
    for v in variants:
        _parse_variant(v)
    rows: list[dict[str, Any]] = []
    for m in dict.fromkeys(methods):  # keep order, drop repeats
        if m != "mdpd":
            rows.append({"name": m, "method": m, "backbone_trainable": None, "checkpointing": False})
            continue
        for v in dict.fromkeys(variants):
            trainable, ckpt, alt = _parse_variant(v)
            row = {
                "name": f"mdpd[{v}]",
                "method": "mdpd",
                "backbone_trainable": trainable,
                "checkpointing": ckpt,
                "schedule": "alternate" if alt else "joint",
            }
            if trainable == "norms_last_k" and last_k is not None:
                row["last_k"] = last_k
            rows.append(row)
    return rows


def _parse_variant(v: str) -> tuple[str, str | bool, bool]:
    """(backbone_trainable, checkpointing choice or False, alternate) of a variant name."""
    from mdpd_vl.backbones.base import checkpoint_segments
    from mdpd_vl.distill.config import RECOMMENDED_CHECKPOINTING

    trainable, *flags = v.split("+")
    names = [f.split("=", 1)[0] for f in flags]
    ckpt: str | bool = False
    for f in flags:
        if f == "ckpt":
            ckpt = RECOMMENDED_CHECKPOINTING
        elif f.startswith("ckpt="):
            ckpt = f[5:]
    try:
        checkpoint_segments(ckpt, 1)
        ok = ckpt not in ("none", "")
    except ValueError:
        ok = False
    pointless = trainable == "head" and ckpt is not False  # nothing is backpropagated through the backbone
    if trainable not in TRAINABLE or any(n not in FLAGS for n in names) or len(set(names)) != len(names) \
            or pointless or not ok or "alt=" in v:
        raise UserError(
            f"unknown mdpd variant {v!r}; valid: <{'|'.join(TRAINABLE)}>[+ckpt[=all|every_<k>|sqrt]][+alt], e.g. "
            f"{', '.join(MDPD_VARIANTS)}, norms_all+ckpt=sqrt", field="--mdpd-variants"
        )
    return trainable, ckpt, "alt" in names


def _distill_overrides(items: list[str] | None) -> dict[str, Any]:
    """`--distill key=value` pairs (YAML values) for every mdpd row, checked against DistillConfig."""
    import yaml

    from mdpd_vl.distill.config import DistillConfig

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"expected key=value, got {item!r}", field="--distill")
        out[key.strip()] = yaml.safe_load(value)
    try:
        DistillConfig.from_dict(out)
    except UserError as err:
        text, field = str(err), err.field or ""
        message = text[len(field) + 2 :] if field and text.startswith(field + ": ") else text
        raise UserError(message, field="--distill" + ("" if field in ("", "distill") else f" {field}")) from None
    return out


def make_job(row: dict[str, Any], args: argparse.Namespace, batch_size: int, infer: bool) -> dict[str, Any]:
    """The JSON a worker receives: everything it needs to build, train and time one row."""
    return {
        **row,
        "backbone": args.backbone,
        "image_size": args.image_size,
        "seq_len": args.seq_len,
        "batch_size": batch_size,
        "device": args.device,
        "precision": args.precision,
        "warmup": args.warmup,
        "steps": args.steps,
        "infer_steps": args.infer_steps if infer else 0,
        "num_classes": args.num_classes,
        "seed": args.seed,
        "threads": args.threads,
        "clock": args.clock,
        "backbone_mode": args.backbone_mode,
        "distill_extra": _distill_overrides(args.distill),
    }


# -- running -----------------------------------------------------------------------------------
def _progress(i: int, n: int, row: dict[str, Any], seconds: float, label: str) -> None:
    if row.get("error"):
        msg = f"FAILED {row['error']}"
    else:
        parts = [
            f"params {_fmt_params(row.get('trainable_params'))}M / {_fmt_params(row.get('inference_params'))}M"
        ]
        if row.get("train_step_s") is not None:
            parts += [f"step {row['train_step_s']:.3f} s", f"peak {_fmt_bytes(row['train_peak_bytes'])}"]
            parts.append(f"state {_fmt_bytes(row['train_state_bytes'])}")
        if row.get("infer_qps") is not None:
            speed = row.get("infer_speed_vs_bare")
            parts.append(f"{row['infer_qps']:.1f} qps" + (f" ({speed:.3f}x bare)" if speed else ""))
        msg = ", ".join(parts)
    print(f"[{i:>2}/{n}] {label}{row['name']:<24} {msg}  ({seconds:.1f} s)", file=sys.stderr, flush=True)


def run_jobs(jobs: list[dict[str, Any]], launcher: Launcher, label: str = "") -> list[dict[str, Any]]:
    """Run jobs one after the other (never in parallel: they would share cores and memory)."""
    results = []
    for i, job in enumerate(jobs, 1):
        t0 = time.perf_counter()
        row = launcher.run(job)
        _progress(i, len(jobs), row, time.perf_counter() - t0, label)
        results.append(row)
    return results


# -- analysis ----------------------------------------------------------------------------------
def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs (bytes per sample); None with fewer than 2 points."""
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def _check(target: str, num: float | None, den: float | None, op: str, bound: float) -> dict[str, Any]:
    """Compare num/den with bound; a miss says by how much in percent of the bound."""
    if num is None or den is None or den == 0:
        return {"target": target, "ratio": None, "op": op, "bound": bound, "ok": None, "miss": "not measured"}
    ratio = num / den
    ok = ratio <= bound if op == "<=" else ratio >= bound if op == ">=" else ratio > bound
    miss = None
    if not ok:
        over = ratio / bound - 1 if op == "<=" else 1 - ratio / bound
        miss = f"misses by {abs(over) * 100:.1f}% ({ratio:.3f} vs {op} {bound:g})"
    return {"target": target, "ratio": ratio, "op": op, "bound": bound, "ok": ok, "miss": miss}


def check_targets(
    results: list[dict[str, Any]], slopes: dict[str, dict[str, float | None]] | None
) -> list[dict]:
    """The targets, as ratios measured in this run (mdpd[head], and mdpd[norms_all+ckpt] for norm tuning)."""
    by = {r["name"]: r for r in results if not r.get("error")}
    ref = by.get(REFERENCE_MDPD) or next((r for n, r in by.items() if n.startswith("mdpd")), None)
    ref_name = ref["name"] if ref else REFERENCE_MDPD

    def get(name: str | dict[str, Any] | None, key: str) -> float | None:
        row = name if isinstance(name, dict) or name is None else by.get(name)
        if row and key == "speed":  # the paired in-process ratio; the bare backbone is 1 by definition
            return 1.0 if row["method"] == "none" else row.get("infer_speed_vs_bare")
        return row.get(key) if row else None

    # Speed compares the paired ratios (drift-free) when every timed row has one, else raw QPS.
    timed = [r for r in by.values() if r.get("infer_qps") is not None and r["method"] != "none"]
    paired = bool(timed) and all(r.get("infer_speed_vs_bare") is not None for r in timed)
    speed, how = ("speed", "inference speed, paired") if paired else ("infer_qps", "infer_qps")
    norms = by.get(NORMS_MDPD) or next((r for n, r in by.items() if n.startswith("mdpd[norms_all+ckpt")), None)
    norms_name = norms["name"] if norms else NORMS_MDPD
    # (row, its name, what, key, compared with, op, bound): issue 17's bar, on the peak; one speed line
    # per side-kept method
    specs = [
        (ref, ref_name, "train_peak_bytes / unipt", "train_peak_bytes", "unipt", "<=", 1.15),
        (ref, ref_name, "train_step_s / unipt", "train_step_s", "unipt", "<=", 1.15),
        (ref, ref_name, "train_peak_bytes / lora", "train_peak_bytes", "lora", "<=", 0.3),
        (ref, ref_name, "train_step_s / lora", "train_step_s", "lora", "<=", 0.5),
        (norms, norms_name, "train_peak_bytes / lora", "train_peak_bytes", "lora", "<=", 0.45),
        (norms, norms_name, "train_step_s / lora", "train_step_s", "lora", "<=", 1.0),
        (ref, ref_name, f"{how} / none (bare backbone)", speed, "none", ">=", 0.99),
    ] + [(ref, ref_name, f"{how} / {s} (side kept)", speed, s, ">", 1.0) for s in SIDE_KEPT if s in by]
    checks = [_check(f"{name} {w}", get(row, k), get(o, k), op, b) for row, name, w, k, o, op, b in specs]
    slope_of = {name: v.get("train_peak_bytes") for name, v in (slopes or {}).items()}
    what = f"{ref_name} memory slope / lora (train_peak_bytes per sample)"
    checks.append(_check(what, slope_of.get(ref_name), slope_of.get("lora"), "<=", 0.35))
    return checks


def scaling_slopes(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per row name: bytes per extra sample of the peak and of the state breakdown."""
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        pts = [r for r in rows if r["name"] == name and not r.get("error")]
        out[name] = {}
        for key in ("train_peak_bytes", "train_state_bytes"):
            good = [r for r in pts if r.get(key) is not None]
            out[name][key] = slope([r["batch_size"] for r in good], [r[key] for r in good])
    return out


# -- formatting --------------------------------------------------------------------------------
def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.4g}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1024**2)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1024:.3g} KiB"


def _short(deployment: str | None) -> str:
    """The deployment note up to its first colon ('merged', 'unmerged', 'faded', ...)."""
    return "-" if not deployment else deployment.split(":")[0]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _clock_words(report: dict[str, Any]) -> str:
    if report["device_type"] == "cuda":
        return "CUDA events"
    settings = report.get("settings", {})
    threads = f", {settings['threads']} thread(s)" if settings.get("threads") else ""
    return ("process CPU seconds" if settings.get("clock") == "cpu" else "wall clock") + threads


def markdown(report: dict[str, Any]) -> str:
    """The table, the target checks and (with --scaling) the slopes, as markdown."""
    res = report["results"]
    lines = [
        f"Backbone `{report['backbone']}`, batch {report['batch_size']}, {report['device']}, "
        f"torch {report['torch']}, {report['precision']}, timing: {_clock_words(report)}.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| method | trainable (M) | inference (M) | train peak | train state | step (s) | QPS | latency (ms) "
        "| speed vs bare | deployed as |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in res:
        if r.get("error"):
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} |" + " - |" * 8)
            continue
        rel = r.get("infer_speed_vs_bare")
        lines.append(
            f"| {r['name']} | {_fmt_params(r['trainable_params'])} | {_fmt_params(r['inference_params'])} | "
            f"{_fmt_bytes(r['train_peak_bytes'])} | {_fmt_bytes(r['train_state_bytes'])} | "
            f"{_fmt(r['train_step_s'], '.4f')} | {_fmt(r['infer_qps'], '.1f')} | "
            f"{_fmt(r['infer_latency_ms'], '.2f')} | {_fmt(rel, '.3f')} | {_short(r.get('deployment'))} |"
        )
    modes = sorted({r.get("backbone_mode") or "eval" for r in res if not r.get("error") and r["method"] != "full"})
    lines += [
        "",
        "train peak = the peak of live tensor bytes over one steady training step (forward, backward, "
        "optimiser step; weights, buffers, inputs, gradients, optimiser state, activations and temporaries), "
        + ("read from the CUDA allocator (`max_memory_allocated`)." if report["device_type"] == "cuda" else
           "tracked exactly over every ATen allocation and free (the semantics of `max_memory_allocated`)."),
        "train state = the breakdown: bytes saved for backward + gradients + AdamW state (exact, never all "
        "alive at once).",
        f"Frozen backbone parts run in mode {', '.join(modes) or 'eval'} for every method (full fine-tuning: train).",
        "speed vs bare = median of paired latency ratios (bare backbone + head / deployed model), timed "
        "alternately in the row's own process, so load drifting between rows cancels out.",
        "",
        "Targets (ratios measured in this run):",
        "",
    ]  # fmt: skip
    for c in report["targets"]:
        mark = "n/a" if c["ok"] is None else "PASS" if c["ok"] else "MISS"
        ratio = "not measured" + ("" if "slope" not in c["target"] else " (run with --scaling batch)")
        if c["ratio"] is not None:
            ratio = f"{c['ratio']:.3f} (target {c['op']} {c['bound']:g})"
        lines.append(f"- **{mark}** {c['target']} = {ratio}" + (f"; {c['miss']}" if c["ok"] is False else ""))
    if report.get("scaling"):
        sc = report["scaling"]
        lines += [
            "",
            f"Memory slope against batch size ({', '.join(map(str, sc['batch_sizes']))}), per sample:",
            "",
        ]
        lines += ["| method | train peak / sample | train state / sample |", "|---|---:|---:|"]
        for name, s in sc["slopes"].items():
            lines.append(
                f"| {name} | {_fmt_bytes(s['train_peak_bytes'])} | {_fmt_bytes(s['train_state_bytes'])} |"
            )
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str | None = None, plot: Any = None, report: Any = None) -> None:
    """Write through a temporary file in the same folder so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")
    if plot is not None:
        plot(report, tmp)
    else:
        tmp.write_text(text or "")
    os.replace(tmp, path)


# -- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The CLI; `--quick` fills in small defaults for every option left unset."""
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", help="open_clip name (ViT-B-32), timm name (resnet50), transformers "
                   f"architecture ({', '.join(bench_worker.HF_ALIASES)}), or 'quick'; random init")  # fmt: skip
    p.add_argument("--batch-size", type=int)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list; `none` = bare backbone + head")
    p.add_argument("--mdpd-variants", help="backbone_trainable[+ckpt[=all|every_<k>|sqrt]][+alt] list (+alt: schedule "
                   f"alternate); default {','.join(MDPD_VARIANTS)} (--profile: head)")
    p.add_argument("--distill", action="append", metavar="KEY=VALUE",
                   help="a DistillConfig setting for every mdpd row (repeatable), e.g. --distill gen_width=bottleneck")
    p.add_argument("--profile", choices=("mdpd",),
                   help="instead of the table: the phases of one mdpd training step (bench_profile.py)")
    p.add_argument(
        "--last-k", type=int, help="blocks whose norms train for norms_last_k (method default if unset)"
    )
    p.add_argument("--image-size", type=int, help="input side for image backbones (default: the model's)")
    p.add_argument("--seq-len", type=int, help="tokens per input for text backbones (default 32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast (CUDA)")
    p.add_argument("--backbone-mode", default="eval", choices=("eval", "bn_eval"),
                   help="mode of every method's frozen backbone parts (MethodConfig.backbone_mode)")
    p.add_argument("--warmup", type=int, help="untimed training steps first (default 3; quick 1)")
    p.add_argument("--steps", type=int, help="timed training steps (default 10; quick 5)")
    p.add_argument("--infer-steps", type=int, help="timed inference batches (default 30; quick 20)")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads per worker (default: torch's)")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="CPU timing: wall time, or process CPU seconds for machines shared with other jobs "
                   "(use with --threads 1); CUDA always uses events")  # fmt: skip
    p.add_argument("--json", default="bench.json", help="results; the .md and .png go next to it")
    p.add_argument("--markdown", help="markdown path (default: <json stem>.md)")
    p.add_argument("--png", help="chart path (default: <json stem>.png)")
    p.add_argument("--scaling", choices=("batch",), help="also sweep batch sizes: memory against batch")
    p.add_argument("--batch-sizes", help="sweep for --scaling batch (default 8,16,32,64; quick 2,4,8)")
    p.add_argument("--launcher", choices=("subprocess", "fork"),
                   help="fresh `python -m` per row, or fork-server children (default: fork with --quick)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row before it is killed")
    p.add_argument("--quick", action="store_true", help="tiny ViT, few steps: all methods in < 2 min on CPU")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def _fill_defaults(args: argparse.Namespace) -> None:
    quick = args.quick
    defaults = {
        "backbone": "quick" if quick else "ViT-B-32",
        "batch_size": 8 if quick else 32,
        "warmup": 1 if quick else 3,
        "steps": 5 if quick else 10,
        "infer_steps": 20 if quick else 30,
        "batch_sizes": "2,4,8" if quick else "8,16,32,64",
        "launcher": "fork" if quick else "subprocess",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "steps", "num_classes"):
        if getattr(args, key) < 1:
            raise UserError("must be at least 1", field="--" + key.replace("_", "-"))
    for key in ("warmup", "infer_steps"):
        if getattr(args, key) < 0:
            raise UserError("must be at least 0", field="--" + key.replace("_", "-"))
    try:
        args.batch_sizes = sorted({int(b) for b in _csv(args.batch_sizes)})
    except ValueError:
        raise UserError(
            f"not a comma list of integers: {args.batch_sizes!r}", field="--batch-sizes"
        ) from None
    if args.scaling and (len(args.batch_sizes) < 2 or args.batch_sizes[0] < 1):
        raise UserError("needs at least two positive batch sizes", field="--batch-sizes")


def _scaling_rows(
    args: argparse.Namespace, rows: list[dict], results: list[dict], launcher: Launcher
) -> list[dict]:
    """Training-only runs for every batch size; the main run's rows are reused at its own size."""
    trained = [r for r in rows if r["method"] != "none"]
    reuse = {r["name"]: r for r in results if not r.get("error")}
    out, jobs = [], []
    for bs in args.batch_sizes:
        for row in trained:
            if bs == args.batch_size and row["name"] in reuse:
                out.append(reuse[row["name"]])
            else:
                jobs.append(make_job(row, args, bs, infer=False))
    out += run_jobs(jobs, launcher, label="scaling ")
    return out


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with --worker, one row of it) and write JSON, markdown and PNG."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.worker:
        return bench_worker.worker_main(args.worker)
    if args.profile:
        from mdpd_vl.bench_profile import run_profile

        return run_profile(args, argv)
    _fill_defaults(args)
    args.mdpd_variants = args.mdpd_variants or ",".join(MDPD_VARIANTS)
    rows = plan_rows(_csv(args.methods), _csv(args.mdpd_variants), args.last_k)
    _distill_overrides(args.distill)  # a bad --distill fails here, before any work
    source = bench_worker.resolve_backbone(args.backbone)  # unknown names fail here, before any work
    device_type, device_name = bench_worker.resolve_device(args.device)
    args.device = device_type
    json_path = Path(args.json)
    md_path = Path(args.markdown) if args.markdown else json_path.with_suffix(".md")
    png_path = Path(args.png) if args.png else json_path.with_suffix(".png")
    import torch

    print(f"bench: {len(rows)} rows on {device_name}, backbone {args.backbone} ({source['kind']}), "
          f"batch {args.batch_size}, launcher {args.launcher}", file=sys.stderr, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mdpd_bench_") as tmp:
        launcher = Launcher(args.launcher, args.timeout, Path(tmp), bench_worker.preload_modules(source))
        results = run_jobs([make_job(r, args, args.batch_size, infer=True) for r in rows], launcher)
        scaling = None
        if args.scaling == "batch":
            srows = _scaling_rows(args, rows, results, launcher)
            scaling = {"batch_sizes": args.batch_sizes, "rows": srows, "slopes": scaling_slopes(srows)}
    report = {
        "format": "mdpd_vl.bench",
        "version": 1,
        "command": "python -m mdpd_vl.bench " + shlex.join(argv),
        "device": device_name,
        "device_type": device_type,
        "backbone": args.backbone,
        "backbone_source": source,
        "batch_size": args.batch_size,
        "torch": torch.__version__,
        "precision": args.precision,
        "settings": {k: getattr(args, k) for k in ("warmup", "steps", "infer_steps", "num_classes", "seed",
                                                     "threads", "clock", "image_size", "seq_len", "launcher", "quick",
                                                     "backbone_mode")},
        "results": results,
        "scaling": scaling,
    }  # fmt: skip
    report["targets"] = check_targets(results, scaling["slopes"] if scaling else None)
    text = markdown(report)
    print(text, end="")
    _write_atomic(json_path, json.dumps(report, indent=2) + "\n")
    _write_atomic(md_path, text)
    _write_atomic(png_path, plot=plot_bars, report=report)
    written = [json_path, md_path, png_path]
    if scaling:
        scaling_png = png_path.with_name(png_path.stem + "_scaling.png")
        _write_atomic(scaling_png, plot=plot_scaling, report=report)
        written.append(scaling_png)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    failed = [r["name"] for r in results + (scaling["rows"] if scaling else []) if r.get("error")]
    if failed:
        print(f"bench: {len(failed)} rows failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
