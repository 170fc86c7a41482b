"""One row of the efficiency benchmark, run in its own process (see `mdpd_vl.bench`).

A row builds the backbone (random init: weights do not change cost), applies one tuning method
with a GAP + linear head, trains on a synthetic classification batch (random inputs and labels,
cross-entropy), and times the model as deployed (`TunedModel.deployed()`: LoRA / AdaLoRA / IA3
merged into the weights, adapters unmerged, side networks kept, MDPD faded; `deployment` says which).
It measures:
- `train_peak_bytes` (THE memory figure): the peak of live tensor bytes over one training step
  (forward, backward, optimiser step), with `torch.cuda.max_memory_allocated` semantics: the
  allocator's peak on CUDA, the exact tensor tracker elsewhere (`engine.memory.train_peak_bytes`);
  measured on a steady-state step (after the first, so the optimiser state exists), the max over
  the phases of `schedule: alternate`;
- the breakdown `train_state_bytes` = saved for backward + gradients + AdamW state (exact, first step),
  and `train_rss_growth_bytes` (CPU: process RSS growth over the post-build baseline, allocator slack
  included; CUDA: the whole phase's max allocated);
- `train_step_s`: median of the timed steps (forward, backward, optimiser step), after warm-up; with
  `schedule: alternate` the mean of the per-phase medians (one side step + one backbone step / 2);
- `infer_qps` / `infer_latency_ms`: median per-batch latency of the deployed model (CUDA events on
  GPU), after warm-up; QPS = batch size / median latency;
- `infer_speed_vs_bare`: the deployed model timed alternately with a freshly built bare backbone +
  head in the same process (median of paired ratios), immune to load drifting between rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdpd_vl.errors import UserError

# transformers architectures by name, built with random init from their default config class
HF_ALIASES: dict[str, dict[str, Any]] = {
    "bert-base": {"model_type": "bert"},
    "bert-large": {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "intermediate_size": 4096},
    "roberta-base": {"model_type": "roberta"},
    "minilm-l6": {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
                  "num_attention_heads": 12, "intermediate_size": 1536},
    "vit-base": {"model_type": "vit"},
    "clip-vision": {"model_type": "clip_vision_model"},
    "clip-text": {"model_type": "clip_text_model"},
}  # fmt: skip
# --quick: a tiny open_clip ViT (64 px, 8 px patches, 4 blocks of width 128); the text tower is shrunk
# too because open_clip always builds both towers before we keep the image one
QUICK_SPEC: dict[str, Any] = {
    "kind": "open_clip_image",
    "name": "ViT-B-32",
    "kwargs": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    },
}
PREFIXES = ("open_clip:", "timm:", "hf:")
RESULT_KEYS = (
    "name", "method", "backbone_trainable", "checkpointing", "schedule", "batch_size", "trainable_params",
    "inference_params", "train_peak_bytes", "train_state_bytes", "saved_bytes", "grad_bytes",
    "optimizer_bytes", "train_step_s", "infer_qps", "infer_latency_ms", "infer_speed_vs_bare", "deployment",
    "backbone_mode", "error",
)  # fmt: skip


# -- backbone names ----------------------------------------------------------------------------
def _open_clip_names() -> set[str]:
    """open_clip's built-in architecture names, read from its config folder (no 9 s import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return set()
    folder = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return {p.stem for p in folder.glob("*.json")}


def _hf_config(model_type: str, extra: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(kind, config dict) for a transformers model type; vision when its config has an image size."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **extra)
    return ("hf_vision" if hasattr(cfg, "image_size") else "hf_text"), {"model_type": model_type, **extra}


def resolve_backbone(name: str, image_size: int | None = None) -> dict[str, Any]:
    """Turn a CLI backbone name into `{"kind", "spec"}` for `build_backbone` (random init).

    Order: 'quick', transformers aliases, open_clip names, timm names, transformers model types;
    prefix with 'open_clip:', 'timm:' or 'hf:' to pick one library when a name exists in several.
    """
    lib, _, bare = name.partition(":") if name.startswith(PREFIXES) else ("", "", name)
    if name == "quick":
        spec = json.loads(json.dumps(QUICK_SPEC))
        if image_size:
            spec["kwargs"]["vision_cfg"]["image_size"] = image_size
        return {"kind": "open_clip_image", "spec": spec}
    if lib in ("", "hf") and bare in HF_ALIASES:
        cfg = dict(HF_ALIASES[bare])
        kind, config = _hf_config(cfg.pop("model_type"), cfg)
        if image_size and kind == "hf_vision":
            config["image_size"] = image_size
        return {"kind": kind, "spec": {"kind": kind, "name": None, "config": config}}
    if lib in ("", "open_clip") and bare in _open_clip_names():
        kwargs = {"force_image_size": image_size} if image_size else {}
        return {
            "kind": "open_clip_image",
            "spec": {"kind": "open_clip_image", "name": bare, "kwargs": kwargs},
        }
    if lib in ("", "timm"):
        import timm

        if timm.is_model(bare):
            kwargs = {"img_size": image_size} if image_size and "vit" in bare else {}
            return {
                "kind": "timm",
                "spec": {"kind": "timm", "name": bare, "image_size": image_size, "kwargs": kwargs},
            }
    if lib in ("", "hf"):
        from transformers import CONFIG_MAPPING

        if bare in CONFIG_MAPPING:
            kind, config = _hf_config(bare, {"image_size": image_size} if image_size else {})
            return {"kind": kind, "spec": {"kind": kind, "name": None, "config": config}}
    raise UserError(
        f"unknown backbone {name!r}; valid: 'quick', {', '.join(HF_ALIASES)}, any open_clip model "
        "(e.g. ViT-B-32, RN50; `python -m mdpd_vl.backbones --list`), any timm model (e.g. resnet50, "
        "efficientnet_b0) or transformers model type (e.g. bert, roberta); prefix open_clip:/timm:/hf: "
        "to choose the library",
        field="--backbone",
    )


def resolve_device(requested: str) -> tuple[str, str]:
    """(device type, human description) for `--device auto|cpu|cuda`; the rows run on that type."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise UserError("CUDA was requested but torch sees no GPU", field="--device")
    if requested == "cuda" or (requested == "auto" and cuda):
        # initialising CUDA in the parent is harmless: rows run in new interpreters (the fork
        # server is itself started by exec, not by forking the parent)
        return "cuda", f"CUDA ({torch.cuda.get_device_name(0)})"
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "cpu", f"CPU ({model}), {cores} cores"


def preload_modules(source: dict[str, Any]) -> list[str]:
    """Modules the fork server imports once, so that each row skips the import bill."""
    lib = {"open_clip_image": "open_clip", "timm": "timm"}.get(source["kind"], "transformers")
    return ["torch", lib, "peft", "mdpd_vl.bench_worker", "mdpd_vl.backbones", "mdpd_vl.tuning"]


# -- one row -----------------------------------------------------------------------------------
def _synthetic_batch(
    backbone: Any, batch_size: int, seq_len: int | None, num_classes: int, device: Any
) -> tuple:
    """Random inputs shaped like the backbone's own example input, and random labels."""
    import torch

    x = backbone.example_input(batch_size)
    if isinstance(x, dict):  # text: valid ids from the probe, tiled to the requested length
        ids = x["input_ids"]
        if seq_len:
            ids = ids.repeat(1, -(-seq_len // ids.shape[1]))[:, :seq_len]
        x = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device)}
    else:
        x = torch.randn(x.shape, device=device, dtype=x.dtype)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    return x, y


def _autocast(job: dict[str, Any]) -> Any:
    import contextlib

    import torch

    if job.get("precision") == "bf16":
        return torch.autocast(job["device"], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], job: dict[str, Any]) -> float:
    """Seconds one call of `fn` takes: CUDA events on GPU (host jitter does not count); on CPU wall
    time, or with `clock: cpu` this process's CPU seconds (all threads), which do not count the time
    other programs hold the cores, so a shared machine still gives comparable numbers."""
    import torch

    if job["device"] == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    clock = time.process_time if job.get("clock") == "cpu" else time.perf_counter
    t0 = clock()
    fn()
    return clock() - t0


def _prime_lazy_state(device: str) -> None:
    """One throwaway AdamW step on a 4-element tensor: torch imports and allocates its optimiser and
    autograd machinery lazily on first use, which would otherwise show up as training memory."""
    import torch

    p = torch.nn.Parameter(torch.zeros(4, device=device))
    opt = torch.optim.AdamW([p])
    (p * 2).sum().backward()
    opt.step()


def release_free_heap() -> bool:
    """Hand free heap pages back to the OS (glibc `malloc_trim`), so that memory freed while building
    (open_clip builds both towers and we keep one) does not sit in the RSS baseline and get reused
    unseen by training. Returns False where there is no glibc."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim with
        return False


def _phases(model: Any) -> tuple[str, ...]:
    """The training phases of `model` (mdpd with `schedule: alternate`: side, backbone)."""
    core = getattr(model, "core", None)
    return tuple(getattr(core, "phases", ("joint",)))


def _phase_now(model: Any) -> str:
    """The phase the next optimiser step of `model` trains."""
    core = getattr(model, "core", None)
    return core._phase() if hasattr(core, "_phase") else "joint"


def measure_training(
    model: Any, step_loss: Callable[[], Any], params: list[Any], optimizer: Any, job: dict[str, Any], inputs: Any = None
) -> dict[str, Any]:
    """Metered first step, warm-up, exact peak of a steady step per phase, timed steps per phase."""
    from mdpd_vl.engine.memory import PeakMemory, measure_train_state, train_peak_bytes

    def loss() -> Any:
        with _autocast(job):
            out = step_loss()
        return out["loss"] if isinstance(out, dict) else out

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    phases = _phases(model)
    release_free_heap()
    with PeakMemory(job["device"]) as phase_peak:
        state = measure_train_state(model, loss, params, optimizer, inputs)  # also the first warm-up step
        for _ in range(max(len(phases) - 1, job["warmup"] - 1)):  # every phase has run once
            step()
        peaks: dict[str, int] = {}
        kind = state["peak_kind"]
        for _ in phases:  # the optimiser step advances an alternate schedule to the next phase
            now = _phase_now(model)
            optimizer.zero_grad(set_to_none=True)
            peaks[now], kind = train_peak_bytes(model, step, optimizer, inputs, device=job["device"])
        _sync(job["device"])
        times: dict[str, list[float]] = {p: [] for p in phases}
        for _ in range(job["steps"] * len(phases)):
            times[_phase_now(model)].append(_timed(step, job))
    gpu = phase_peak.kind == "cuda_allocated"
    return {
        "train_peak_bytes": max(peaks.values()),
        "train_peak_by_phase": peaks,
        "peak_kind": kind,
        "train_state_bytes": state["train_state_bytes"],
        "saved_bytes": state["saved_bytes"],
        "grad_bytes": state["grad_bytes"],
        "optimizer_bytes": state["optim_bytes"],
        "train_rss_growth_bytes": phase_peak.peak_bytes if gpu else phase_peak.increase_bytes,
        "train_step_s": statistics.fmean(statistics.median(t) for t in times.values()),
        "train_step_s_by_phase": {p: statistics.median(t) for p, t in times.items()},
    }


def measure_inference(model: Any, x: Any, job: dict[str, Any], bare: Any = None) -> dict[str, Any]:
    """Median per-batch latency of `model(x)` in eval mode without autograd, and the QPS it gives.

    With `bare` (a freshly built backbone + head), the two are timed alternately in this process and
    `infer_speed_vs_bare` is the median of the paired latency ratios bare / model: on a shared or
    throttling machine the load drifts between rows, and pairing cancels that drift.
    """
    import torch

    models = [model] if bare is None else [model, bare]
    for m in models:
        m.eval()
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode(), _autocast(job):
        for _ in range(max(2, job["infer_steps"] // 5)):
            for m in models:
                m(x)
        _sync(job["device"])
        for i in range(job["infer_steps"]):
            order = range(len(models)) if i % 2 == 0 else reversed(range(len(models)))  # no order bias
            for k in order:
                times[k].append(_timed(lambda k=k: models[k](x), job))
    latency = statistics.median(times[0])
    out = {"infer_latency_ms": latency * 1000.0, "infer_qps": job["batch_size"] / latency}
    if bare is not None:
        out["infer_speed_vs_bare"] = statistics.median(b / m for m, b in zip(times[0], times[1]))
    return out


def _method_config(job: dict[str, Any]) -> Any:
    """The tuning config of this row (mdpd: its backbone_trainable / checkpointing variant)."""
    from mdpd_vl.tuning import MethodConfig

    method = "linear" if job["method"] == "none" else job["method"]
    common: dict[str, Any] = {"backbone_mode": job.get("backbone_mode") or "eval"}
    if method == "adalora":  # peft's rank schedule needs the run length: the rows' own steps
        common["peft"] = {"total_step": 4 + int(job.get("warmup", 1)) + 2 * int(job.get("steps", 1))}
    if method != "mdpd":
        return MethodConfig(name=method, **common)
    from mdpd_vl.distill.config import DistillConfig

    distill = {**(job.get("distill_extra") or {}), "backbone_trainable": job["backbone_trainable"],
               "checkpointing": job["checkpointing"], "schedule": job.get("schedule") or "joint"}
    if job.get("last_k") is not None:
        distill["last_k"] = job["last_k"]
    return MethodConfig(name=method, distill=DistillConfig(**distill), **common)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build, train and time one row; returns the result row (`bench.RESULT_KEYS` and a few more)."""
    import torch
    import torch.nn.functional as F

    from mdpd_vl.backbones import build_backbone
    from mdpd_vl.heads.pooling import GAPLinear
    from mdpd_vl.tuning import apply_method

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job.get("seed", 0)))
    device = job["device"]
    source = resolve_backbone(job["backbone"], job.get("image_size"))
    backbone = build_backbone(source["spec"])
    num_classes = int(job["num_classes"])

    def head(width: int) -> GAPLinear:
        return GAPLinear(width, num_classes)

    tuned = apply_method(backbone, head, _method_config(job))
    tuned.to(device)
    seq_len = job.get("seq_len") or (32 if source["kind"] == "hf_text" else None)
    x, y = _synthetic_batch(backbone, job["batch_size"], seq_len, num_classes, device)
    row: dict[str, Any] = {k: job.get(k) for k in RESULT_KEYS}  # unmeasured fields stay None
    # `none` is the bare backbone + head, untuned: the reference for inference speed
    row["trainable_params"] = 0 if job["method"] == "none" else int(tuned.trainable_params)
    row["inference_params"] = int(tuned.inference_params)
    row["deployment"] = "bare backbone + head" if job["method"] == "none" else tuned.deployment
    row["backbone_mode"] = tuned.backbone_mode
    if job["method"] != "none":
        _prime_lazy_state(device)
        groups = tuned.optimizer_groups()
        params = [p for g in groups for p in g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=1e-4)
        tuned.train()

        def step_loss() -> Any:
            # the method's own weighted sum: task loss plus, for mdpd, the distillation terms
            _, losses = tuned.train_forward(x, lambda out: F.cross_entropy(out, y))
            return sum(losses.values())

        row.update(measure_training(tuned, step_loss, params, optimizer, job, inputs=(x, y)))
        del optimizer, groups, params
    if job.get("infer_steps"):
        deployed = tuned.deployed()
        del tuned  # the deployed model must stand alone; drop the training-time wrapper
        bare = apply_method(build_backbone(source["spec"]), head, _method_config({"method": "none"}))
        row.update(measure_inference(deployed, x, job, bare.deployed().to(device)))
    row["error"] = None
    return row


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _redirect_output(log: str) -> None:
    """Send this process's stdout/stderr (library warnings, tracebacks) to the row's log file."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def child(job: dict[str, Any]) -> None:
    """Entry of a fork-server child: run the row and write its JSON; a failure exits non-zero."""
    if job.get("log"):
        _redirect_output(job["log"])
    _write_json(job["out"], run_job(job))


def worker_main(arg: str) -> int:
    """`python -m mdpd_vl.bench --worker <json or path>`: one row; prints its JSON unless `out` is set."""
    text = arg if arg.lstrip().startswith("{") else Path(arg).read_text()
    job = json.loads(text)
    if job.get("log"):
        _redirect_output(job["log"])
    row = run_job(job)
    if job.get("out"):
        _write_json(job["out"], row)
    else:
        print(json.dumps(row))
    return 0


# -- fresh processes ---------------------------------------------------------------------------
def _failed(job: dict[str, Any], message: str) -> dict[str, Any]:
    row = {k: job.get(k) for k in RESULT_KEYS}
    row["error"] = message
    return row


def _log_tail(path: Path) -> str:
    """The last line of a row's log: the exception message when a worker died of one."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


class Launcher:
    """Starts one fresh process per job: `python -m mdpd_vl.bench --worker <json>`, or (`fork`) a
    child of a fork server that imported torch and the model libraries once, which saves the 5-15 s
    import bill per row on slow CPUs. Either way a row owns its process and its memory."""

    def __init__(self, kind: str, timeout: float, workdir: Path, preload: list[str]):
        self.kind, self.timeout, self.workdir = kind, timeout, workdir
        self._count = 0
        self._ctx = None
        if kind == "fork":
            import multiprocessing as mp

            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(preload)

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job to completion; a crash or timeout becomes a row with `error` set."""
        self._count += 1
        index = self._count
        out, log = self.workdir / f"job{index}.json", self.workdir / f"job{index}.log"
        job = {**job, "out": str(out), "log": str(log)}
        if self.kind == "fork":
            assert self._ctx is not None
            proc = self._ctx.Process(target=child, args=(job,))
            proc.start()
            proc.join(self.timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
                return _failed(job, f"timed out after {self.timeout:.0f} s")
            code = proc.exitcode
        else:
            cmd = [sys.executable, "-m", "mdpd_vl.bench", "--worker", json.dumps(job)]
            try:
                code = subprocess.run(cmd, timeout=self.timeout, stdin=subprocess.DEVNULL).returncode
            except subprocess.TimeoutExpired:
                return _failed(job, f"timed out after {self.timeout:.0f} s")
        if code != 0 or not out.exists():
            return _failed(job, f"worker exit {code}: {_log_tail(log)}")
        return json.loads(out.read_text())
