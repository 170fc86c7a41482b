"""The benchmark's charts (`python -m mdpd_vl.bench` writes them next to its JSON): memory, step time
and inference speed per method, and memory against batch size with `--scaling batch`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REFERENCE_MDPD = "mdpd[head]"


def _plot_setup() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _log_if_wide(ax: Any, values: list[float], axis: str) -> None:
    """Log scale when the positive values span more than two decades (tiny heads beside full tuning)."""
    pos = [v for v in values if v > 0]
    if pos and max(pos) / min(pos) > 100:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")


def _label_bars(ax: Any, ys: list[float], values: list[float | None], labels: list[str]) -> None:
    for y, v, text in zip(ys, values, labels):
        ax.annotate(text if v is not None else "n/a", (v or 0, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=7, bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.3})  # fmt: skip


def plot_bars(report: dict[str, Any], path: Path) -> None:
    """Three panels per method: training memory (state and peak), step time, inference QPS."""
    plt = _plot_setup()
    res = [r for r in report["results"] if not r.get("error")]
    names = [r["name"] for r in res]
    fig, axes = plt.subplots(1, 3, figsize=(16, 0.45 * len(names) + 2.0), sharey=True)
    ys = list(range(len(names)))
    mib = {k: [r[k] / 1024**2 if r.get(k) is not None else None for r in res]
           for k in ("train_state_bytes", "train_peak_bytes")}  # fmt: skip
    for (key, label, color), dy in zip(
        (
            ("train_peak_bytes", "peak (live bytes)", "tab:orange"),
            ("train_state_bytes", "state breakdown", "tab:blue"),
        ),
        (-0.2, 0.2),
    ):
        pos = [y + dy for y in ys]
        axes[0].barh(pos, [v or 0 for v in mib[key]], height=0.4, label=label, color=color)
        _label_bars(axes[0], pos, mib[key], [f"{v:.3g}" if v is not None else "" for v in mib[key]])
    _log_if_wide(axes[0], [v for vs in mib.values() for v in vs if v], "x")
    axes[0].set_xlabel("training memory (MiB)")
    axes[0].legend(loc="lower right", fontsize=8)
    steps = [r.get("train_step_s") for r in res]
    axes[1].barh(ys, [v or 0 for v in steps], color="tab:green")
    _label_bars(axes[1], ys, steps, [f"{v:.3g}" if v is not None else "" for v in steps])
    axes[1].set_xlabel("training step (s, median)")
    qps = [r.get("infer_qps") for r in res]
    speed = [r.get("infer_speed_vs_bare") for r in res]
    paired = any(v is not None for v in speed)
    # paired speed (drift-free) when measured, raw QPS otherwise; the labels always carry the QPS
    bars, ref = (
        (speed, 1.0) if paired else (qps, next((q for r, q in zip(res, qps) if r["name"] == "none"), None))
    )
    axes[2].barh(ys, [v or 0 for v in bars], color="tab:purple")
    texts = [(f"{p:.3f}x, " if p else "") + f"{q:.4g} qps" if q else "" for q, p in zip(qps, speed)]
    _label_bars(axes[2], ys, bars, texts)
    axes[2].set_xlabel("inference speed vs bare backbone (paired)" if paired else "inference QPS as deployed")
    if ref:
        axes[2].axvline(ref, ls="--", color="k", lw=1, label="bare backbone")
        axes[2].axvline(0.99 * ref, ls=":", color="k", lw=1, label="0.99 x bare")
        axes[2].legend(loc="lower right", fontsize=8)
    axes[0].set_yticks(ys, names)
    axes[0].set_ylim(len(names) + 0.9, -0.6)  # top-down order, and room under the last bar for legends
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
        ax.margins(x=0.15)
    axes[2].set_xlim(0, max([v or 0 for v in bars] + [ref or 0]) * 1.45 or 1.0)  # room for the labels
    fig.suptitle(f"{report['backbone']}, batch {report['batch_size']}, {report['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(report: dict[str, Any], path: Path) -> None:
    """Training memory against batch size, one line per method (exact state and measured peak)."""
    plt = _plot_setup()
    rows = report["scaling"]["rows"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for i, name in enumerate(names):
        pts = sorted(
            (r for r in rows if r["name"] == name and not r.get("error")), key=lambda r: r["batch_size"]
        )
        style = {"lw": 2.5} if name == REFERENCE_MDPD or name == "lora" else {"lw": 1.2}
        for ax, key in zip(axes, ("train_state_bytes", "train_peak_bytes")):
            good = [r for r in pts if r.get(key) is not None]
            ax.plot([r["batch_size"] for r in good], [r[key] / 1024**2 for r in good], marker="o",
                    label=name, color="k" if name == REFERENCE_MDPD else colors[i % len(colors)], **style)  # fmt: skip
    for ax, key, title in zip(axes, ("train_state_bytes", "train_peak_bytes"),
                              ("train state (breakdown)", "train peak (live bytes)")):  # fmt: skip
        _log_if_wide(ax, [r[key] for r in rows if r.get(key)], "y")
        ax.set_xlabel("batch size")
        ax.set_ylabel("MiB")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"memory against batch size: {report['backbone']}, {report['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
