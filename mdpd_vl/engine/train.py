"""The one training loop: AdamW over named parameter groups, warmup + decay, accumulation, resume.

Runs on `accelerate` (CPU, one GPU, or several processes started by `torchrun` /
`accelerate launch`; bf16 autocast on GPU). Contracts the recipes rely on:

- `step_fn(model, batch, step) -> dict[str, Tensor]` with a `"loss"` entry; the other entries are
  logged (scalars, averaged over micro-batches, processes and the log window). `step` is the
  0-based optimizer step, shared by the micro-batches of one accumulation window.
- Gradients are reset with `zero_grad(set_to_none=True)`, so a parameter whose `.grad` stays None in
  a step (it took no part in the loss) is **not** updated: AdamW skips it entirely, no moment decay,
  no weight decay. `schedule: alternate` (side step / backbone step) relies on this.
- Several processes (`mdpd_vl.dist`): the model is not wrapped in DDP (step_fn may call any method of
  it); as DDP does, every process starts from rank 0's trainable tensors and buffers, the gradients
  are averaged across processes after each accumulation window, and rank 0's floating buffers are
  copied to all ranks after each step. BatchNorm layers compute
  their training statistics over the global batch (`dist.synced_batchnorm`), and in-batch losses
  gather the global batch themselves (`dist.gather_batch`), so N processes with `batch_size` B/N
  train what one process with B trains. Only the main process writes into the run folder
  (checkpoints, with every process's RNG state, metrics, config.json); `eval_fn` runs on the main
  process only while the others wait. Called inside a `dist.main_first` / `dist.on_main` section
  (a stage the main process runs alone, e.g. VQA's shared connector alignment), `train` runs as one
  process: the whole batch, no collectives.
- Batch and learning rate: `batch_size` is per process and micro-batch; the global batch of an
  optimizer step is batch_size x grad_accum x processes (`batch_facts`). `lr_scaling: none` keeps
  every group's lr whatever the number of processes; `linear` multiplies it by the number of
  processes (the linear scaling rule, for a per-process batch kept as is).
- Data order: the permutation seeded by `seed + epoch` is cut into global micro-batches of
  batch_size x processes samples, and process `rank` reads the rank-th slice of each, so the
  gathered global batch is, in order, the one-process batch of the same global size. Every epoch has
  the same number of full accumulation windows (the leftover samples of a permutation are skipped),
  so a checkpoint's (epoch, batch) says exactly what was consumed. A dataset with `set_epoch(epoch)`
  (`IndexDataset`: which caption is drawn) is told the epoch before each epoch's loader is made.
- A fresh start (`resume=None`) in a folder that holds checkpoints is refused (UserError).
- Exact resume (CPU, same settings): model, optimizer, scheduler, RNG and data position are restored;
  with worker processes each sample is loaded under a seed derived from (seed, epoch, index).
  A resume whose settings differ from the checkpoint's (lr, schedule, warmup, batch size, seed, the
  recipe's method and its knobs, per-group hyper-parameters, ...) is refused in one line naming every
  key that differs; only keys matching `checkpoint.RESUME_FREE` (+ `resume_free`) may change (more
  epochs, logging, evaluation, paths), and those changes are recorded in `config.json`.
- Non-finite numbers stop the run before they are saved: a NaN/inf loss or gradient norm before the
  update, non-finite weights before a checkpoint is written (`NonFiniteError`, naming the last good
  checkpoint, which is finite by construction).
"""

from __future__ import annotations

import contextlib
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

from mdpd_vl import dist
from mdpd_vl.engine import checkpoint as ckpt
from mdpd_vl.engine.config import TrainConfig
from mdpd_vl.errors import UserError

log = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, Any, int], Mapping[str, Tensor]]
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]

_GROUP_KEYS = {"name", "params", "lr", "weight_decay", "betas", "eps"}


class NonFiniteLossError(ckpt.NonFiniteError):
    """The loss (or the gradient norm) became NaN/inf; the run stopped before updating the weights.
    Its message names the step as passed to step_fn (0-based) and the last good checkpoint."""


@dataclass
class TrainResult:
    """What a `train` call did. `losses` holds the mean loss of each optimizer step run by this call
    (averaged over processes). `batch` is `batch_facts`; `weights_digests` holds one sha1 of the final
    trained tensors per process (several processes only; all equal unless they fell out of step)."""

    step: int
    epoch: int
    losses: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    resumed_from: int | None = None
    checkpoint: Path | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)
    weights_digests: list[str] = field(default_factory=list)


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


def lr_factor(cfg: TrainConfig, world: int) -> float:
    """What every group's lr is multiplied by on `world` processes (`cfg.lr_scaling`)."""
    return float(world) if cfg.lr_scaling == "linear" else 1.0


def batch_facts(cfg: TrainConfig, world: int | None = None) -> dict[str, Any]:
    """Per-process batch, processes, global batch and the lr rule of a run on `world` processes
    (default: this run's); the `training` entry of results.json."""
    world = dist.world_size() if world is None else world
    per_process = cfg.batch_size * cfg.grad_accum
    return {"processes": world, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "per_process_batch": per_process, "global_batch": per_process * world,
            "lr_scaling": cfg.lr_scaling, "lr_factor": lr_factor(cfg, world)}


def steps_per_epoch(n: int, cfg: TrainConfig, world: int | None = None) -> int:
    """Optimizer steps of one epoch over `n` samples on `world` processes (default: this run's);
    0 when one step cannot be filled. What a step_fn needs to know the epoch of step `step`."""
    world = dist.world_size() if world is None else world
    return n // (cfg.batch_size * world) // cfg.grad_accum


def _require(ok: bool, message: str) -> None:
    if not ok:  # a programming error of the recipe, not a user mistake
        raise ValueError(message)


def build_optimizer(
    model: nn.Module, param_groups: Sequence[Mapping[str, Any]], cfg: TrainConfig
) -> tuple[torch.optim.AdamW, dict[str, nn.Parameter]]:
    """AdamW over the named groups (own `lr` / `weight_decay` optional); also returns name -> param."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    trainable: dict[str, nn.Parameter] = {}
    for g in param_groups:
        label = repr(g.get("name"))
        _require(
            "name" in g and "params" in g and set(g) <= _GROUP_KEYS,
            f"a param group has keys {sorted(_GROUP_KEYS)} ('name', 'params' required); got {sorted(g)}",
        )
        _require(all(g["name"] != other["name"] for other in groups), f"param group {label} appears twice")
        params = list(g["params"])
        _require(bool(params), f"param group {label} is empty")
        for p in params:
            _require(
                id(p) in names, f"param group {label} holds a tensor that is not a parameter of the model"
            )
            _require(names[id(p)] not in trainable, f"parameter {names[id(p)]} is in two param groups")
            _require(p.requires_grad, f"parameter {names[id(p)]} in group {label} does not require grad")
            trainable[names[id(p)]] = p
        groups.append({**g, "params": params})
    if not groups:
        raise ValueError("no param groups: nothing to train")
    opt = torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    return opt, trainable


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + decay over `total` optimizer steps, one multiplier for every group's own peak lr."""
    fn = partial(lr_multiplier, total=total, warmup=warmup_steps(cfg, total), schedule=cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


# ----------------------------------------------------------------------------- data order


def epoch_batches(
    n: int, *, epoch: int, seed: int, batch_size: int, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """Index batches of one epoch for process `rank`: the permutation seeded by `seed + epoch` in
    global micro-batches of `batch_size x world`, full ones only, of which `rank` reads slice `rank`
    (concatenated in rank order they are the one-process batches of size `batch_size x world`)."""
    gen = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    size = batch_size * world
    lo = rank * batch_size
    return [perm[i + lo : i + lo + batch_size] for i in range(0, n - size + 1, size)]


def _set_epoch(dataset: Any, epoch: int) -> None:
    """`set_epoch(epoch)` on the dataset, or on the one a wrapper (`Subset`) holds."""
    for _ in range(8):  # wrappers of wrappers, never a cycle
        if dataset is None:
            return
        if callable(getattr(dataset, "set_epoch", None)):
            dataset.set_epoch(epoch)
            return
        dataset = getattr(dataset, "dataset", None)


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


def _make_accelerator() -> Any:
    from accelerate import Accelerator

    dist.init()  # the recipe may have joined the process group already (main_first before training)
    # cpu=True is what makes accelerate honour torchrun's env (MULTI_CPU + gloo) on a machine without GPU.
    # Mixed precision is applied here (autocast around step_fn), not through AcceleratorState, which
    # refuses a second, different setting in the same process.
    return Accelerator(cpu=not dist.has_accelerator())


def _resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return cfg.mixed_precision


def _all_ranks_flat(tensors: list[Tensor], op: Callable[[Tensor], Any]) -> None:
    """Apply a collective `op` to `tensors` as one flat buffer per (device, dtype), then copy back."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for group in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        op(flat)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _sync_grads(params: list[nn.Parameter], world: int) -> None:
    """Average gradients over processes; a grad that exists on any rank exists (zeros) on all."""
    import torch.distributed as dist

    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    for p, has in zip(params, present.tolist()):
        if has and p.grad is None:
            p.grad = torch.zeros_like(p)

    def mean(flat: Tensor) -> None:
        dist.all_reduce(flat)
        flat /= world

    _all_ranks_flat([p.grad for p in params if p.grad is not None], mean)


def _sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's floating buffers (e.g. BatchNorm running stats) to every rank, as DDP does."""
    import torch.distributed as dist

    _all_ranks_flat([b for b in model.buffers() if b.is_floating_point()], lambda f: dist.broadcast(f, src=0))


def _broadcast_start(model: nn.Module, params: list[nn.Parameter]) -> None:
    """Rank 0's trainable tensors and floating buffers on every rank (DDP broadcasts them when it wraps
    a model), so a recipe whose initialisation drew other random numbers on another process still
    trains one model."""
    import torch.distributed as dist

    with torch.no_grad():
        tensors = [p.data for p in params] + [b for b in model.buffers() if b.is_floating_point()]
        _all_ranks_flat(tensors, lambda f: dist.broadcast(f, src=0))


def _scalar(value: Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"step_fn returned {key!r} with shape {tuple(value.shape)}; only scalars are logged"
            )
        return value.detach().float().reshape(())
    return torch.tensor(float(value))


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
    resume_free: Sequence[str] = (),
) -> TrainResult:
    """Train `model` on `dataset` with AdamW over `param_groups`; log, checkpoint and resume in `run_dir`.

    `config` is the resolved run config (a dict) written to `run_dir/config.json` with the seed, and
    compared key by key on resume; `resume_free` adds fnmatch patterns of its keys that a resume may
    change (besides `checkpoint.RESUME_FREE`).
    `resume`: 'auto' (resume when run_dir has a checkpoint), True (must), a checkpoint path, or None.
    `eval_fn(model, step) -> {name: float}` runs every `cfg.eval_every` steps and at the end, on the
    main process only (the others wait; their `eval_metrics` stay empty).
    """
    t0 = time.perf_counter()
    free = (*ckpt.RESUME_FREE, *resume_free)
    with dist.synced_batchnorm(model):
        run = _Run(model, step_fn, dataset, collate_fn, param_groups, cfg, run_dir, resume, config, free)
        _loop(run, eval_fn, progress)
    run.result.wall_seconds = time.perf_counter() - t0
    return run.result


def _loop(run: _Run, eval_fn: EvalFn | None, progress: bool) -> None:
    cfg = run.cfg
    run.open_progress(progress)
    try:
        for batches in run.data_windows():
            run.optimizer_step(batches)
            if (
                eval_fn is not None
                and cfg.eval_every
                and run.done % cfg.eval_every == 0
                and run.done < run.total
            ):
                run.evaluate(eval_fn)
            # after eval, so that the saved RNG state includes whatever the evaluation drew
            if cfg.ckpt_every and run.done % cfg.ckpt_every == 0 and run.done < run.total:
                run.save()
        if eval_fn is not None:
            run.evaluate(eval_fn)
        if run.result.checkpoint != run.ckpt_path(run.done):
            run.save()
        run.check_in_step()
    finally:
        run.close()


class _Run:
    """The state one `train` call shares between its loop, its logs and its checkpoints."""

    def __init__(self, model, step_fn, dataset, collate_fn, param_groups, cfg, run_dir, resume, config, free):
        start_from = ckpt.resolve_resume(Path(run_dir), resume)  # before anything is created on disk
        self.acc = _make_accelerator()
        self.rank, self.world, self.device = self.acc.process_index, self.acc.num_processes, self.acc.device
        if dist.in_section():  # a stage one process runs alone (main_first / on_main): no collectives
            self.rank, self.world = 0, 1
        self.run_dir = Path(run_dir)
        dist.on_main(ckpt.check_run_dir, run_dir)  # one writer: the others wait until it exists
        self.model, self.step_fn, self.cfg = model, step_fn, cfg
        self.dataset, self.collate_fn = dataset, collate_fn
        model.to(self.device)
        self.optimizer, self.trainable = build_optimizer(model, param_groups, cfg)
        for g in self.optimizer.param_groups:  # before the scheduler records each group's peak lr
            g["lr"] *= lr_factor(cfg, self.world)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.group_names = [g["name"] for g in self.optimizer.param_groups]
        n = len(dataset)
        self.windows = steps_per_epoch(n, cfg, self.world)
        if self.windows == 0:
            need = cfg.batch_size * cfg.grad_accum * self.world
            raise UserError(
                f"{n} samples cannot fill one step of {need} (batch_size x grad_accum x processes)",
                field="train.batch_size",
            )
        self.total = cfg.max_steps or cfg.epochs * self.windows
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total)
        # what a checkpoint holds besides RNG and position
        self.parts = {
            "model": model,
            "trainable": self.trainable,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
        }
        self.meta = {
            "world_size": self.world,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
            "dataset_len": n,
            "groups": self.group_names,
            "group_sizes": [len(g["params"]) for g in self.optimizer.param_groups],
            "settings": ckpt.run_settings(cfg, config),
            "group_hparams": ckpt.group_hparams(self.optimizer),
        }
        self.free, self.changed = free, []
        self.pos = {"step": 0, "epoch": 0, "batch": 0}
        if self.acc.is_main_process:
            ckpt.remove_partial(self.run_dir)  # temp folders of a save that was killed or failed
        self._start(start_from)
        if self.world > 1:  # every process starts from rank 0's tensors, as DDP's constructor makes them
            _broadcast_start(model, self.params)
        precision = _resolve_precision(cfg, self.device)
        self.autocast = (
            partial(torch.autocast, device_type=self.device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext
        )
        if self.acc.is_main_process:
            facts = {
                "world_size": self.world,
                "batch": batch_facts(cfg, self.world),
                "mixed_precision": precision,
                "total_steps": self.total,
                "device": str(self.device),
            }
            if start_from is not None:  # what this run changed over the checkpoint it resumed
                facts["resumed_from"] = {"checkpoint": str(start_from), "step": self.pos["step"],
                                         "changed": {k: {"checkpoint": a, "now": b} for k, a, b in self.changed}}
            ckpt.write_run_config(self.run_dir, cfg, config, facts)
        resumed = self.pos["step"] if start_from is not None else None
        self.metrics = ckpt.MetricsLog(self.run_dir, self.acc.is_main_process, resumed)
        self.result = TrainResult(
            step=self.done, epoch=self.pos["epoch"], resumed_from=resumed, checkpoint=start_from,
            batch=batch_facts(cfg, self.world),
        )
        self.bar: Any = None
        self.window: dict[str, list[float]] = {}
        self.t_log, self.since_log = time.perf_counter(), 0
        self.samples_per_step = cfg.batch_size * cfg.grad_accum * self.world
        model.train()

    @property
    def done(self) -> int:
        """Optimizer steps completed so far (including those before a resume)."""
        return self.pos["step"]

    def _start(self, start_from: Path | None) -> None:
        if start_from is not None:
            check = partial(self._check_resume, start_from)
            loaded = ckpt.load_checkpoint(start_from, **self.parts, rank=self.rank, check_meta=check)
            self.pos = dict(loaded["position"])
            log.info("resuming from %s (step %d)", start_from, self.done)
            return
        if (earlier := ckpt.latest_checkpoint(self.run_dir)) is not None:  # never overwrite a run by accident
            raise UserError(
                f"holds checkpoints of an earlier run (newest: {earlier.name}); resume it, "
                "or use another run folder",
                where=str(self.run_dir),
            )
        ckpt.seed_everything(self.cfg.seed + self.rank)

    def _check_resume(self, path: Path, saved: Mapping[str, Any]) -> None:
        """Refuse a resume whose settings differ from the checkpoint's; keep the free ones that changed."""
        self.changed = ckpt.check_resume(path, saved, self.meta, self.free)

    def open_progress(self, progress: bool) -> None:
        if progress and self.acc.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc="train", dynamic_ncols=True)

    def data_windows(self) -> Iterable[list[Any]]:
        """Accumulation windows of micro-batches (on the device) from the current position to the end."""
        from accelerate.utils import send_to_device

        while self.done < self.total:
            group: list[Any] = []
            for batch in self._epoch_loader():
                group.append(send_to_device(batch, self.device))
                if len(group) == self.cfg.grad_accum:
                    yield group
                    group = []
                    if self.done >= self.total:
                        return

    def _epoch_loader(self) -> Iterable[Any]:
        """The rest of the current epoch: its batches from position `pos['batch']` on."""
        cfg, epoch = self.cfg, self.pos["epoch"]
        _set_epoch(self.dataset, epoch)  # before the loader: worker processes copy the dataset
        batches = epoch_batches(
            len(self.dataset),
            epoch=epoch,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            rank=self.rank,
            world=self.world,
        )[: self.windows * cfg.grad_accum]
        # not the rank: item i draws the same augmentation whichever process loads it (one does per epoch)
        base = (cfg.seed * 100_003 + epoch) * 1_009
        # a private generator: creating the loader must not draw from the global RNG a resume restores
        return torch.utils.data.DataLoader(
            _SeededItems(self.dataset, base),
            batch_sampler=batches[self.pos["batch"] :],
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(base),
        )

    def optimizer_step(self, batches: list[Any]) -> None:
        """Forward/backward every micro-batch, sync, clip, check, step, advance the position, log."""
        step, cfg = self.done, self.cfg
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        values = _forward_backward(self.model, self.step_fn, batches, step, self.autocast)
        if self.world > 1:
            _sync_grads(self.params, self.world)
        grad_norm = None
        with_grad = [p for p in self.params if p.grad is not None]
        if cfg.max_grad_norm is not None and with_grad:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(with_grad, cfg.max_grad_norm))
        values = _reduce_values(values, self.world)
        for what, value in (("loss", values["loss"]), ("grad norm", grad_norm)):
            if value is not None and not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"{what} is {value} at step {step} (epoch {self.pos['epoch']}); stopped before updating "
                    f"the weights; last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'} "
                    "(lower the lr or check the inputs)",
                    where=str(self.run_dir),
                    field="loss",
                )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            _sync_buffers(self.model)
        self.pos["step"] += 1
        self.pos["batch"] += cfg.grad_accum
        if self.pos["batch"] >= self.windows * cfg.grad_accum:
            self.pos["epoch"], self.pos["batch"] = self.pos["epoch"] + 1, 0
        self.result.step, self.result.epoch = self.done, self.pos["epoch"]
        self._record(values, grad_norm, lrs)

    def _record(self, values: dict[str, float], grad_norm: float | None, lrs: list[float]) -> None:
        self.result.losses.append(values["loss"])
        for k, v in [*values.items(), *([("grad_norm", grad_norm)] if grad_norm is not None else [])]:
            self.window.setdefault(k, []).append(v)
        self.since_log += 1
        samples_s = self.since_log * self.samples_per_step / max(1e-9, time.perf_counter() - self.t_log)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", samples_s=f"{samples_s:.1f}")
        if self.done % self.cfg.log_every == 0 or self.done == self.total:
            line = {k: sum(v) / len(v) for k, v in self.window.items()}
            line.update({f"lr/{name}": lr for name, lr in zip(self.group_names, lrs)})
            line.update(epoch=self.pos["epoch"], samples_per_s=samples_s)
            self.metrics.write(self.done, line)
            self.result.last_metrics = line
            self.window, self.t_log, self.since_log = {}, time.perf_counter(), 0

    def evaluate(self, eval_fn: EvalFn) -> None:
        """`eval_fn` on the main process (the others wait), logged there."""
        got = dist.on_main(eval_fn, self.model, self.done)
        if got is not None:
            values = {f"eval/{k}": float(v) for k, v in got.items()}
            self.result.eval_metrics = values
            self.metrics.write(self.done, values)
        self.model.train()

    def check_in_step(self) -> None:
        """Several processes: one digest of the trained tensors each, compared (a bug would let them drift)."""
        if self.world == 1:
            return
        self.result.weights_digests = dist.all_gather_object(ckpt.tensors_digest(self.model, self.trainable))
        if len(set(self.result.weights_digests)) > 1:
            log.error("the processes ended with different weights (digests %s)", self.result.weights_digests)

    def ckpt_path(self, step: int) -> Path:
        return self.run_dir / ckpt.CKPT_SUBDIR / f"step-{step:08d}"

    def save(self) -> None:
        self.result.checkpoint = ckpt.save_checkpoint(
            self.run_dir,
            self.done,
            **self.parts,
            position=self.pos,
            meta=self.meta,
            rank=self.rank,
            keep=self.cfg.keep_checkpoints,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()


def _forward_backward(
    model: nn.Module, step_fn: StepFn, batches: list[Any], step: int, autocast: Callable[[], Any]
) -> dict[str, Tensor]:
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
