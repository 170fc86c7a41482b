"""`python -m mdpd_vl.bench --profile mdpd`: where one MDPD training step spends its seconds and bytes.

The step (zero_grad, forward, backward, AdamW step) of the bench's synthetic classification task is
cut into the phases `DualPath` marks (`distill/phases.py`): the frozen backbone pass, the side
network, the two heads, the bottlenecks phi, the generation blocks G, the losses, the rest of the
forward, backward and the optimiser step. Every boundary reads one clock, and the interval since the
previous boundary goes to the innermost open phase, so the phases add up to the step exactly.

- seconds: median over the timed steps of each phase's total (`--clock cpu`: process CPU seconds);
- bytes, on one more step with the exact tracker of `engine.memory` (`LiveTensorBytes`, or the
  CUDA allocator's peak per phase on a GPU): the peak of live tensor bytes inside the phase and the
  live bytes at its (last) end, both absolute (weights, AdamW state and inputs included), and the
  bytes autograd saved for backward while the phase ran (distinct storages, parameters excluded).
  The largest phase peak is the step's `train_peak_bytes`.

Default targets: ViT-B-32 at batch 32 (random init, as the bench), and both towers of the offline
pair at the embedded ITR default's size (128 px images, 32-token captions, batch 112, side width
192, head-only tuning, as `mdpd_vl/tasks/itr.py` sets them), each tower on its own with the bench's
GAP + linear head (ITR's VSE loss, which couples the towers, is one B x B similarity on top).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mdpd_vl.distill.phases import recording
from mdpd_vl.engine.memory import LiveTensorBytes, _state_tensors, _storage_key
from mdpd_vl.errors import UserError

PHASES = ("backbone", "side", "heads", "phi", "G", "losses", "forward", "backward", "optimizer", "zero_grad")
WORDS = {
    "backbone": "frozen backbone pass", "side": "side network", "heads": "heads W_S, W_B",
    "phi": "bottlenecks phi", "G": "generation blocks G (mask + convs)", "losses": "losses",
    "forward": "rest of the forward (masks, bookkeeping)", "backward": "backward",
    "optimizer": "AdamW step", "zero_grad": "zero_grad",
}  # fmt: skip
OFFLINE = ("offline_image", "offline_text")
# (label, backbone, batch, image size, side width d or None = the method default)
DEFAULT_TARGETS = (
    ("ViT-B-32, batch 32", "ViT-B-32", 32, None, None),
    ("offline image tower (EfficientNet-Lite0), 128 px, batch 112", "offline_image", 112, 128, 192),
    ("offline text tower (MiniLM-L6), 32 tokens, batch 112", "offline_text", 112, None, 192),
)


class PhaseBytes(LiveTensorBytes):
    """`LiveTensorBytes` that also keeps the peak of the current segment (between two `mark()`s)."""

    def __init__(self, baseline: Any = ()):
        super().__init__(baseline)
        self.segment_peak = self.current_bytes

    def mark(self) -> tuple[int, int]:
        """(peak since the last mark, live bytes now); starts a new segment."""
        now = self.sweep()
        peak, self.segment_peak = max(self.segment_peak, now), now
        return peak, now

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        # the base class sweeps only above the step's peak; a segment's lower peak needs its own sweep
        if self.current_bytes > self.segment_peak and self.sweep() > self.segment_peak:
            self.segment_peak = self.current_bytes
        return out


class CudaBytes:
    """The CUDA allocator's view with the `PhaseBytes.mark()` interface (peak reset at every mark)."""

    def __init__(self, device: torch.device):
        self.device = device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)

    def mark(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        peak, now = torch.cuda.max_memory_allocated(self.device), torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(peak), int(now)


class StepRecorder:
    """Times every phase (innermost wins) and, with `meter`, reads its peak and end bytes and the bytes
    autograd saves while it is open."""

    def __init__(self, clock: Callable[[], float], meter: Any = None, exclude: tuple[Tensor, ...] = ()):
        self.clock, self.meter = clock, meter
        self.stack: list[str] = []
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.peak = dict.fromkeys(PHASES, 0)
        self.end = dict.fromkeys(PHASES, 0)
        self.saved = dict.fromkeys(PHASES, 0)
        self._excluded = {_storage_key(t)[:2] for t in exclude}
        self._seen: set[tuple[str, int]] = set()
        self._last = clock()

    def _switch(self) -> None:
        now = self.clock()
        top = self.stack[-1] if self.stack else None
        if top is not None:
            self.seconds[top] += now - self._last
        if self.meter is not None:
            peak, _live = self.meter.mark()
            if top is not None:
                self.peak[top] = max(self.peak[top], peak)
        self._last = self.clock()  # the meter's sweep is not the phase's time

    def enter(self, name: str) -> None:
        self._switch()
        self.stack.append(name if name in self.seconds else "forward")

    def exit(self, name: str) -> None:
        self._switch()
        top = self.stack.pop()
        if self.meter is not None:
            self.end[top] = self.meter.mark()[1]

    def pack(self, t: Tensor) -> Tensor:
        try:
            key = _storage_key(t)
        except (RuntimeError, NotImplementedError):
            return t
        if key[:2] not in self._excluded and key[:2] not in self._seen and self.stack:
            self._seen.add(key[:2])
            self.saved[self.stack[-1]] += key[2]
        return t


def _step(model: Any, step_loss: Callable[[], Tensor], optimizer: Any, recorder: StepRecorder) -> None:
    from mdpd_vl.distill.phases import phase

    with recording(recorder):
        with phase("zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        saved = torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t)
        with phase("forward"), (saved if recorder.meter is not None else contextlib.nullcontext()):
            loss = step_loss()
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            optimizer.step()


def build_target(backbone: str, batch: int, image_size: int | None, seq_len: int, side_d: int | None,
                 job: dict[str, Any]) -> tuple[Any, Callable[[], Tensor], list[Any], Any, tuple]:
    """(tuned model, step loss, params, AdamW, inputs) of one profile target, as a bench row builds it."""
    import torch.nn.functional as F

    from mdpd_vl.backbones import build_backbone
    from mdpd_vl.bench_worker import _method_config, _prime_lazy_state, _synthetic_batch, resolve_backbone
    from mdpd_vl.heads.pooling import GAPLinear
    from mdpd_vl.tuning import apply_method

    spec = {"kind": backbone} if backbone in OFFLINE else resolve_backbone(backbone, image_size)["spec"]
    bb = build_backbone(spec)
    classes = int(job.get("num_classes", 10))
    cfg = _method_config({**job, "method": "mdpd"})
    if side_d is not None:
        cfg.d = side_d
    tuned = apply_method(bb, lambda w: GAPLinear(w, classes), cfg).to(job["device"])
    x, y = _synthetic_batch(bb, batch, seq_len if bb.modality == "text" else None, classes, job["device"])
    if image_size and isinstance(x, Tensor) and x.dim() == 4:
        x = torch.randn(batch, x.shape[1], image_size, image_size, device=x.device, dtype=x.dtype)
    _prime_lazy_state(job["device"])
    groups = tuned.optimizer_groups()
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    tuned.train()

    def step_loss() -> Tensor:
        from mdpd_vl.bench_worker import _autocast

        with _autocast(job):
            _, losses = tuned.train_forward(x, lambda out: F.cross_entropy(out, y))
            return sum(losses.values())  # type: ignore[return-value]

    return tuned, step_loss, [p for g in groups for p in g["params"]], optimizer, (x, y)


def profile_one(label: str, backbone: str, batch: int, image_size: int | None, seq_len: int, side_d: int | None,
                job: dict[str, Any]) -> dict[str, Any]:
    """Warm-up steps, timed steps, one metered step; the phase table of one target as a dict."""
    from mdpd_vl.bench_worker import release_free_heap

    tuned, step_loss, params, optimizer, inputs = build_target(backbone, batch, image_size, seq_len, side_d, job)
    exclude = tuple(tuned.parameters())
    clock = time.process_time if job.get("clock") == "cpu" and job["device"] != "cuda" else time.perf_counter
    sync = torch.cuda.synchronize if job["device"] == "cuda" else (lambda: None)

    def timed_clock() -> float:
        sync()
        return clock()

    for _ in range(job["warmup"]):
        _step(tuned, step_loss, optimizer, StepRecorder(timed_clock))
    runs = []
    for _ in range(job["steps"]):
        rec = StepRecorder(timed_clock)
        t0 = timed_clock()
        _step(tuned, step_loss, optimizer, rec)
        runs.append((timed_clock() - t0, rec.seconds))
    # the median step, whole: its phases add up to it (up to the few calls outside any phase)
    step_seconds, seconds = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    release_free_heap()
    optimizer.zero_grad(set_to_none=True)
    if job["device"] == "cuda":
        meter: Any = CudaBytes(torch.device(job["device"]))
        rec = StepRecorder(timed_clock, meter, exclude)
        _step(tuned, step_loss, optimizer, rec)
        baseline = 0
    else:
        with PhaseBytes(_state_tensors(tuned, optimizer, inputs)) as meter:
            baseline = meter.baseline_bytes
            rec = StepRecorder(timed_clock, meter, exclude)
            _step(tuned, step_loss, optimizer, rec)
    core = tuned.core
    groups = {k: sum(p.numel() for p in v) for k, v in core.param_groups().items()}
    phases = {
        p: {"seconds": seconds[p], "peak_bytes": rec.peak[p], "end_bytes": rec.end[p],
            "saved_bytes": rec.saved[p]}
        for p in PHASES
    }  # fmt: skip
    return {
        "label": label, "backbone": backbone, "batch_size": batch, "image_size": image_size,
        "variant": job.get("variant"), "distill": {k: v for k, v in vars(core.cfg).items()},
        "step_seconds": step_seconds, "steps_seconds": sorted(r[0] for r in runs), "phase_seconds_sum": sum(v["seconds"] for v in phases.values()),
        "train_peak_bytes": max(rec.peak.values()), "baseline_bytes": baseline,
        "trainable_by_group": groups, "phases": phases,
    }  # fmt: skip


def _mib(n: float) -> str:
    return f"{n / 1024**2:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """One table per target: seconds, share of the step, peak / end / saved MiB per phase."""
    lines = [f"Command: `{report['command']}`", "", f"{report['device']}, torch {report['torch']}, "
             f"{report['precision']}, timing: {report['clock_words']}.", ""]  # fmt: skip
    for t in report["targets"]:
        step = t["step_seconds"]
        groups = ", ".join(f"{k} {v / 1e6:.3g}M" for k, v in t["trainable_by_group"].items() if v)
        lines += [
            f"**{t['label']}**, mdpd[{t['variant']}]: step {step:.3f} s (phases sum {t['phase_seconds_sum']:.3f} s), "
            f"train peak {_mib(t['train_peak_bytes'])} MiB"
            + (f" (of which {_mib(t['baseline_bytes'])} MiB alive before the step: weights, AdamW state, inputs)"
               if t["baseline_bytes"] else "") + f"; trainable: {groups}.",
            "",
            "| phase | seconds | share | peak in phase (MiB) | live at end (MiB) | saved for backward (MiB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for name, p in t["phases"].items():
            share = p["seconds"] / step if step else 0.0
            lines.append(f"| {WORDS[name]} | {p['seconds']:.3f} | {share:.1%} | {_mib(p['peak_bytes'])} | "
                         f"{_mib(p['end_bytes'])} | {_mib(p['saved_bytes'])} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def run_profile(args: argparse.Namespace, argv: list[str]) -> int:
    """Profile every target (one process, targets one after the other) and write JSON + markdown."""
    from mdpd_vl import bench_worker
    from mdpd_vl.bench import _distill_overrides, _write_atomic

    if args.profile != "mdpd":
        raise UserError(f"unknown profile {args.profile!r}; valid: mdpd", field="--profile")
    device_type, device_name = bench_worker.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in (args.mdpd_variants or "head").split(",") if v.strip()]
    if args.backbone:
        targets = [(f"{args.backbone}, batch {args.batch_size or 32}", args.backbone, args.batch_size or 32,
                    args.image_size, None)]  # fmt: skip
    else:
        targets = list(DEFAULT_TARGETS)
    from mdpd_vl.bench import plan_rows

    rows = plan_rows(["mdpd"], variants)
    extra = _distill_overrides(args.distill)
    results = []
    for row in rows:
        for label, backbone, batch, size, side_d in targets:
            job = {**row, "variant": row["name"][5:-1], "device": device_type, "precision": args.precision,
                   "warmup": 1 if args.warmup is None else args.warmup, "steps": args.steps or 3,
                   "clock": args.clock, "num_classes": args.num_classes, "backbone_mode": args.backbone_mode,
                   "distill_extra": extra}  # fmt: skip
            torch.manual_seed(args.seed)
            results.append(profile_one(label, backbone, batch, size, args.seq_len or 32, side_d, job))
            print(f"profiled {label} mdpd[{job['variant']}]: step {results[-1]['step_seconds']:.3f} s",
                  flush=True, file=__import__("sys").stderr)  # fmt: skip
    clock = "CUDA synchronised wall clock" if device_type == "cuda" else (
        "process CPU seconds" if args.clock == "cpu" else "wall clock")
    report = {
        "format": "mdpd_vl.bench_profile", "version": 1, "command": "python -m mdpd_vl.bench " + " ".join(argv),
        "device": device_name, "torch": torch.__version__, "precision": args.precision,
        "clock_words": clock + (f", {args.threads} thread(s)" if args.threads else ""), "targets": results,
    }  # fmt: skip
    text = markdown(report)
    print(text, end="")
    json_path = Path(args.json if args.json != "bench.json" else "bench_profile.json")
    _write_atomic(json_path, json.dumps(report, indent=2) + "\n")
    _write_atomic(Path(args.markdown) if args.markdown else json_path.with_suffix(".md"), text)
    return 0
