"""The one training loop: AdamW over named parameter groups, warmup + decay, accumulation, resume.

Runs on `accelerate` (CPU, one GPU, or several processes started by `torchrun` /
`accelerate launch`; bf16 autocast on GPU). Contracts the recipes rely on:

- `step_fn(model, batch, step) -> dict[str, Tensor]` with a `"loss"` entry; the other entries are
  logged (scalars, averaged over micro-batches, processes and the log window). `step` is the
  0-based optimizer step, shared by the micro-batches of one accumulation window.
- Gradients are reset with `zero_grad(set_to_none=True)`, so a parameter whose `.grad` stays None in
  a step (it took no part in the loss) is **not** updated: AdamW skips it entirely, no moment decay,
  no weight decay. `schedule: alternate` (side step / backbone step) relies on this.
- Several processes: the model is not wrapped in DDP (step_fn may call any method of it); the
  gradients are averaged across processes after each accumulation window instead, and rank 0's
  floating buffers (BatchNorm statistics) are copied to all ranks after each step, as DDP does.
- Data order: process `rank` reads the permutation seeded by `seed + epoch`, strided by the number
  of processes; every epoch has the same number of full accumulation windows (the leftover samples
  of a permutation are skipped), so a checkpoint's (epoch, batch) says exactly what was consumed.
- A fresh start (`resume=None`) in a folder that holds checkpoints is refused (UserError).
- Exact resume (CPU, same settings): model, optimizer, scheduler, RNG and data position are restored;
  with worker processes each sample is loaded under a seed derived from (seed, epoch, index).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mdpd_vl.engine import checkpoint as ckpt
from mdpd_vl.engine.config import TrainConfig, atomic_write_text, dump_config
from mdpd_vl.errors import UserError

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any, int], Mapping[str, Tensor]]
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]

_GROUP_KEYS = {"name", "params", "lr", "weight_decay", "betas", "eps"}


class NonFiniteLossError(UserError):
    """The loss (or the gradient norm) became NaN/inf; the run stopped before updating the weights."""


@dataclass
class TrainResult:
    """What a `train` call did. `losses` holds the mean loss of each optimizer step run by this call."""

    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int | None = None
    checkpoint: Path | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- schedule


def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """LR factor of optimizer step `step` (0-based): linear warmup to 1 over `warmup` steps
    ((step + 1) / warmup, so the first step already learns), then cosine/linear decay to 0 or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {schedule!r}")


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """`cfg.warmup_steps` if set, else `round(cfg.warmup_ratio * total)`."""
    return cfg.warmup_steps or round(cfg.warmup_ratio * total)


def build_optimizer(
    model: nn.Module, param_groups: Sequence[Mapping[str, Any]], cfg: TrainConfig
) -> tuple[torch.optim.AdamW, dict[str, nn.Parameter]]:
    """AdamW over the named groups (own `lr` / `weight_decay` optional); also returns name -> param."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups, trainable, seen_groups = [], {}, set()
    for g in param_groups:
        unknown = set(g) - _GROUP_KEYS
        if unknown or "name" not in g or "params" not in g:
            raise ValueError(f"a param group needs 'name' and 'params' (and maybe {_GROUP_KEYS}); got {sorted(g)}")
        if g["name"] in seen_groups:
            raise ValueError(f"param group {g['name']!r} appears twice")
        seen_groups.add(g["name"])
        params = list(g["params"])
        if not params:
            raise ValueError(f"param group {g['name']!r} is empty")
        for p in params:
            if id(p) not in names:
                raise ValueError(f"param group {g['name']!r} holds a tensor that is not a parameter of the model")
            if names[id(p)] in trainable:
                raise ValueError(f"parameter {names[id(p)]} is in two param groups")
            if not p.requires_grad:
                raise ValueError(f"parameter {names[id(p)]} in group {g['name']!r} does not require grad")
            trainable[names[id(p)]] = p
        groups.append({**g, "params": params})
    if not groups:
        raise ValueError("no param groups: nothing to train")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return opt, trainable


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + decay over `total` optimizer steps, one multiplier for every group's own peak lr."""
    fn = partial(lr_multiplier, total=total, warmup=warmup_steps(cfg, total), schedule=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------- data order


def epoch_batches(n: int, *, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Index batches of one epoch for process `rank`: the permutation seeded by `seed + epoch`,
    cut to a multiple of `world`, strided by rank, in full batches only."""
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=gen)[: n - n % world][rank::world].tolist()
    return [perm[i : i + batch_size] for i in range(0, len(perm) - batch_size + 1, batch_size)]


class _SeededItems(torch.utils.data.Dataset):
    """Loads item i under a seed made of (base, i) inside worker processes, so random transforms
    do not depend on which worker got the batch (and a resumed epoch sees the same samples)."""

    def __init__(self, dataset: Any, base: int):
        self.dataset, self.base = dataset, base

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            s = (self.base * 1_000_003 + int(i)) % 2**62
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.manual_seed(s)
        return self.dataset[i]


# ----------------------------------------------------------------------------- helpers


def _has_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


def _make_accelerator() -> Any:
    from accelerate import Accelerator

    # cpu=True is what makes accelerate honour torchrun's env (MULTI_CPU + gloo) on a machine without GPU.
    # Mixed precision is applied here (autocast around step_fn), not through AcceleratorState, which
    # refuses a second, different setting in the same process.
    return Accelerator(cpu=not _has_accelerator())


def _resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return cfg.mixed_precision


def _sync_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over processes; a grad that exists on any rank exists (zeros) on all."""
    import torch.distributed as dist

    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    for p, has in zip(params, present.tolist()):
        if has and p.grad is None:
            p.grad = torch.zeros_like(p)
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's floating buffers (e.g. BatchNorm running stats) to every rank, as DDP does."""
    import torch.distributed as dist

    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for b in model.buffers():
        if b.is_floating_point():
            by_kind.setdefault((b.device, b.dtype), []).append(b)
    for bufs in by_kind.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in bufs:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


class _MetricsLog:
    """metrics.jsonl in the run folder (+ TensorBoard when importable); main process only."""

    def __init__(self, run_dir: Path, active: bool, resume_step: int | None):
        self.path, self.active, self.tb = run_dir / "metrics.jsonl", active, None
        if not active:
            return
        kept = []
        if resume_step is not None and self.path.is_file():  # drop lines the resumed run re-logs
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        except ImportError:
            self.tb = None

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.active:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _scalar(value: Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"step_fn returned {key!r} with shape {tuple(value.shape)}; only scalars are logged")
        return value.detach().float().reshape(())
    return torch.tensor(float(value))


def _write_run_config(run_dir: Path, cfg: TrainConfig, config: Mapping[str, Any] | None, facts: dict[str, Any]) -> None:
    content = {"seed": cfg.seed, **facts, "train": dump_config(cfg)}
    if config is not None:
        content["config"] = dict(config)
    atomic_write_text(run_dir / "config.json", json.dumps(content, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    step_fn: StepFn,
    dataset: Any,
    collate_fn: Callable[[list[Any]], Any] | None,
    param_groups: Sequence[Mapping[str, Any]],
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool | str | Path | None = "auto",
    eval_fn: EvalFn | None = None,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train `model` on `dataset` with AdamW over `param_groups`; log, checkpoint and resume in `run_dir`.

    `config` is the resolved run config (a dict) written to `run_dir/config.json` with the seed.
    `resume`: 'auto' (resume when run_dir has a checkpoint), True (must), a checkpoint path, or None.
    """
    t0 = time.perf_counter()
    start_from = ckpt.resolve_resume(Path(run_dir), resume)  # before anything is created on disk
    run_dir = ckpt.check_run_dir(run_dir)
    acc = _make_accelerator()
    rank, world, device = acc.process_index, acc.num_processes, acc.device
    model.to(device)
    optimizer, trainable = build_optimizer(model, param_groups, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    group_names = [g["name"] for g in optimizer.param_groups]

    n = len(dataset)
    windows = (n // world // cfg.batch_size) // cfg.grad_accum
    if windows == 0:
        need = cfg.batch_size * cfg.grad_accum * world
        raise UserError(f"{n} samples cannot fill one step of {need} (batch_size x grad_accum x processes)",
                        field="train.batch_size")
    total = cfg.max_steps or cfg.epochs * windows
    scheduler = build_scheduler(optimizer, cfg, total)
    meta = {"world_size": world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
            "dataset_len": n, "groups": group_names, "group_sizes": [len(g["params"]) for g in optimizer.param_groups]}

    pos = {"step": 0, "epoch": 0, "batch": 0}
    if start_from is not None:
        loaded = ckpt.load_checkpoint(start_from, model=model, trainable=trainable, optimizer=optimizer,
                                      scheduler=scheduler, rank=rank)
        _check_resume_meta(start_from, loaded["meta"], meta)
        pos = dict(loaded["position"])
        log.info("resuming from %s (step %d)", start_from, pos["step"])
    else:
        if (earlier := ckpt.latest_checkpoint(run_dir)) is not None:  # never overwrite a run by accident
            raise UserError(f"holds checkpoints of an earlier run (newest: {earlier.name}); resume it, "
                            "or use another run folder", where=str(run_dir))
        ckpt.seed_everything(cfg.seed + rank)

    precision = _resolve_precision(cfg, device)
    main = acc.is_main_process
    if main:
        _write_run_config(run_dir, cfg, config, {"world_size": world, "mixed_precision": precision,
                                                  "total_steps": total, "device": str(device)})
    metrics = _MetricsLog(run_dir, main, pos["step"] if start_from is not None else None)
    result = TrainResult(step=pos["step"], epoch=pos["epoch"], resumed_from=pos["step"] if start_from else None)
    result.checkpoint = start_from
    autocast = (partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext)
    per_step_samples = cfg.batch_size * cfg.grad_accum * world

    def save(step: int) -> Path:
        return ckpt.save_checkpoint(run_dir, step, model=model, trainable=trainable, optimizer=optimizer,
                                    scheduler=scheduler, position=pos, meta=meta, rank=rank,
                                    barrier=acc.wait_for_everyone, keep=cfg.keep_checkpoints)

    def run_eval(step: int) -> None:
        values = {f"eval/{k}": float(v) for k, v in eval_fn(model, step).items()}  # type: ignore[misc]
        result.eval_metrics = values
        metrics.write(step, values)
        model.train()

    bar = None
    if main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=pos["step"], desc="train", dynamic_ncols=True)
    model.train()
    window: dict[str, list[float]] = {}
    t_log, steps_since_log = time.perf_counter(), 0
    try:
        while pos["step"] < total:
            loader = _epoch_loader(dataset, collate_fn, cfg, pos, rank, world, windows, device)
            for batches in _windows(loader, cfg.grad_accum, device):
                if pos["step"] >= total:
                    break
                step = pos["step"]
                lrs = [g["lr"] for g in optimizer.param_groups]
                values = _forward_backward(model, step_fn, batches, step, autocast)
                if world > 1:
                    _sync_grads(params, world)
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    with_grad = [p for p in params if p.grad is not None]
                    if with_grad:
                        grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, cfg.max_grad_norm))
                values = _reduce_values(values, world)
                bad = {k: v for k, v in (("loss", values["loss"]), ("grad norm", grad_norm))
                       if v is not None and not math.isfinite(v)}
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    (what, val), = list(bad.items())[:1]
                    last = ckpt.latest_checkpoint(run_dir)
                    raise NonFiniteLossError(
                        f"{what} is {val} at step {step} (epoch {pos['epoch']}); stopped before updating the "
                        f"weights; last good checkpoint: {last or 'none'} (lower the lr or check the inputs)",
                        where=str(run_dir), field="loss")
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if world > 1:
                    _sync_buffers(model)
                pos["step"] += 1
                pos["batch"] += cfg.grad_accum
                if pos["batch"] >= windows * cfg.grad_accum:
                    pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0
                result.losses.append(values["loss"])
                for k, v in values.items():
                    window.setdefault(k, []).append(v)
                if grad_norm is not None:
                    window.setdefault("grad_norm", []).append(grad_norm)
                steps_since_log += 1
                done = pos["step"]
                if bar is not None:
                    bar.update(1)
                    sps = steps_since_log * per_step_samples / max(1e-9, time.perf_counter() - t_log)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{sps:.1f}")
                if done % cfg.log_every == 0 or done == total:
                    elapsed = time.perf_counter() - t_log
                    line = {k: sum(v) / len(v) for k, v in window.items()}
                    line.update({f"lr/{name}": lr for name, lr in zip(group_names, lrs)})
                    line.update(epoch=pos["epoch"], samples_per_s=steps_since_log * per_step_samples / max(elapsed, 1e-9))
                    metrics.write(done, line)
                    result.last_metrics = line
                    window, t_log, steps_since_log = {}, time.perf_counter(), 0
                if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
                    run_eval(done)
                # after eval, so that the saved RNG state includes whatever the evaluation drew
                if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < total:
                    result.checkpoint = save(done)
        if eval_fn is not None:
            run_eval(pos["step"])
        if result.checkpoint != run_dir / ckpt.CKPT_SUBDIR / f"step-{pos['step']:08d}":
            result.checkpoint = save(pos["step"])
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    result.step, result.epoch = pos["step"], pos["epoch"]
    result.wall_seconds = time.perf_counter() - t0
    return result


def _check_resume_meta(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any]) -> None:
    for key in ("world_size", "batch_size", "grad_accum", "seed", "dataset_len", "groups", "group_sizes"):
        if saved.get(key) != now.get(key):
            raise UserError(
                f"checkpoint was written with {key}={saved.get(key)!r}, this run has {now.get(key)!r}; "
                "resume with the same settings or use a fresh run folder",
                where=str(path), field=key)


def _epoch_loader(dataset: Any, collate_fn: Any, cfg: TrainConfig, pos: Mapping[str, int], rank: int,
                  world: int, windows: int, device: torch.device) -> Iterable[Any]:
    """The rest of the current epoch: its batches from position `pos['batch']` on."""
    batches = epoch_batches(len(dataset), epoch=pos["epoch"], seed=cfg.seed, batch_size=cfg.batch_size,
                            rank=rank, world=world)[: windows * cfg.grad_accum][pos["batch"]:]
    base = (cfg.seed * 100_003 + pos["epoch"]) * 1_009 + rank
    # a private generator: creating the loader must not draw from the global RNG a resume restores
    return torch.utils.data.DataLoader(
        _SeededItems(dataset, base), batch_sampler=batches, collate_fn=collate_fn,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(base))


def _windows(loader: Iterable[Any], grad_accum: int, device: torch.device) -> Iterable[list[Any]]:
    from accelerate.utils import send_to_device

    group: list[Any] = []
    for batch in loader:
        group.append(send_to_device(batch, device))
        if len(group) == grad_accum:
            yield group
            group = []


def _forward_backward(model: nn.Module, step_fn: StepFn, batches: list[Any], step: int,
                      autocast: Callable[[], Any]) -> dict[str, Tensor]:
    """Run step_fn on each micro-batch, backward loss / k; return the summed (detached) scalars / k."""
    sums: dict[str, Tensor] = {}
    k = len(batches)
    for batch in batches:
        with autocast():
            out = step_fn(model, batch, step)
        if "loss" not in out:
            raise KeyError(f"step_fn must return a dict with a 'loss' entry; got {sorted(out)}")
        (out["loss"] / k).backward()
        for key, value in out.items():
            v = _scalar(value, key) / k
            sums[key] = sums[key] + v.to(sums[key].device) if key in sums else v
    return sums


def _reduce_values(values: Mapping[str, Tensor], world: int) -> dict[str, float]:
    """One host sync per step: stack the logged scalars, average over processes, read them out."""
    keys = sorted(values)
    stacked = torch.stack([values[k].to(values["loss"].device) for k in keys])
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(stacked)
        stacked /= world
    return dict(zip(keys, stacked.tolist()))
