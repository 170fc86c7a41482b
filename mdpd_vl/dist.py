"""Several processes, one writer: who writes shared state, who waits, and what in-batch losses see.

`torchrun --nproc_per_node N -m mdpd_vl.tasks.<task>` or `accelerate launch --num_processes N -m ...`
starts N copies of the same recipe. Everything here works unchanged in one plain process (then every
call is a no-op or runs its function directly), so library code uses it unconditionally:

- `rank()`, `world_size()`, `is_main()`: read from `torch.distributed` once it is initialised, else
  from the launcher's environment (`RANK`, `WORLD_SIZE`), so DataLoader workers answer the same.
- `main_first()`: the main process runs the block first (builds the shapes world, writes a feature
  cache), the others wait and then run it themselves, finding what it wrote (they only read).
- `on_main(fn)`: `fn` runs on the main process only (evaluation, export, results, cards, charts); the
  others wait and get None. A failure on the main process stops the others with its exit status
  (`PeerFailed`, silent: the main process reports the error once).
- Sections nest: inside one, a nested `main_first` / `on_main` needs no further collective (the
  outer one already orders the processes), and inside a main-only section `gather_batch` and the
  synchronised BatchNorm work on the local batch (the other processes are not there to answer).
- `gather_batch(*tensors)`: the global batch of in-batch losses (contrastive, hardest negative,
  relational KL), gradients flowing to the local shard; `synced_batchnorm(model)`: BatchNorm
  statistics over the global batch; `mean_weight(rows)`: the weight that turns a mean over a
  varying number of local rows (valid frames) into its share of the global mean. Both make N processes with B/N samples each train what one
  process with B samples trains (`tests/test_multiproc*.py` checks it).

The waiting processes wait on a separate gloo group whose timeout is `MDPD_DIST_TIMEOUT` seconds
(default 7200): long enough for the main process to evaluate a large test split or build a feature
cache. Nothing here imports `mdpd_vl.engine`, so heads may import it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")
TIMEOUT_ENV = "MDPD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 7200

_state: dict[str, Any] = {"control": None, "section": None}


class PeerFailed(SystemExit):
    """The main process failed inside a section the others were waiting on; they stop with its exit
    status and print nothing (the main process has reported the error)."""


# ----------------------------------------------------------------------------- who am I
def has_accelerator() -> bool:
    """A CUDA / MPS / XPU device is present (else the processes run on CPUs with gloo)."""
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available())


EXIT_WAIT_S = 60.0  # how long a finished process waits for its peers at exit


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes of this run (1 without a launcher)."""
    if _initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index, 0 for the main one."""
    if _initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes shared state (the only one without a launcher)."""
    return rank() == 0


def init() -> None:
    """Join the launcher's process group (through accelerate, as the engine's Accelerator does, so
    it finds the group ready) and open the gloo group the waiting processes wait on. Idempotent;
    nothing happens in a single process."""
    if _state["control"] is not None or world_size() == 1:
        return
    if not _initialized():
        from accelerate import PartialState

        # cpu=True is what makes accelerate honour torchrun's env (MULTI_CPU + gloo) without a GPU
        PartialState(cpu=not has_accelerator())
    seconds = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    _state["control"] = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    atexit.register(_close)


def _close() -> None:
    """Leave the process group at exit, as torch asks: a process that just exits while a peer still
    reads its last message can make the peer's gloo transport abort."""
    if _initialized():
        with contextlib.suppress(Exception):
            # every process reaches this point before any tears its transport down; a peer that
            # died does not hold the others longer than EXIT_WAIT_S
            if _state["control"] is not None and _state["section"] is None:
                torch.distributed.monitored_barrier(group=_state["control"],
                                                    timeout=timedelta(seconds=EXIT_WAIT_S))
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


def barrier() -> None:
    """Wait until every process is here (no-op in one process or inside a section)."""
    if world_size() == 1 or _state["section"] is not None:
        return
    init()
    torch.distributed.barrier(group=_state["control"])


def all_gather_object(obj: Any) -> list[Any]:
    """`obj` of every process, in rank order ([obj] in one process)."""
    if world_size() == 1 or _state["section"] is not None:
        return [obj]
    init()
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj, group=_state["control"])
    return out


# ----------------------------------------------------------------------------- sections
def _exit_status(err: BaseException) -> int:
    from mdpd_vl.errors import UserError

    if isinstance(err, SystemExit):
        return err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
    if isinstance(err, UserError):
        return 2  # what cli_entry makes of it on the main process
    if isinstance(err, KeyboardInterrupt):
        return 130
    return 1


def _announce(status: int | None) -> None:
    """Tell the waiting processes how the main one left the section: None = done, else its exit status."""
    torch.distributed.broadcast_object_list([status], src=0, group=_state["control"])


def _await_main() -> None:
    box: list[Any] = ["pending"]
    torch.distributed.broadcast_object_list(box, src=0, group=_state["control"])
    if box[0] is not None:
        raise PeerFailed(box[0])


def in_section() -> bool:
    """Inside a `main_first` block or an `on_main` call."""
    return _state["section"] is not None


@contextlib.contextmanager
def _section(kind: str) -> Iterator[None]:
    _state["section"] = kind
    try:
        yield
    finally:
        _state["section"] = None


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block, then the others run it (after it succeeded; they stop with
    its status when it failed). What the block writes must be written only when `is_main()`: the
    others find it there and read it."""
    if world_size() == 1 or in_section():
        yield
        return
    init()
    if is_main():
        try:
            with _section("main_first"):
                yield
        except BaseException as err:
            _announce(_exit_status(err))
            raise
        _announce(None)
        return
    _await_main()
    with _section("main_first"):
        yield


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`fn(*args, **kwargs)` on the main process only; the others wait for it and get None.

    Inside the call, in-batch gathering and BatchNorm synchronisation use the local batch (the other
    processes are waiting, not computing)."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    if in_section():  # the outer section already orders the processes
        return fn(*args, **kwargs) if is_main() else None
    init()
    if not is_main():
        _await_main()
        return None
    try:
        with _section("main_only"):
            value = fn(*args, **kwargs)
    except BaseException as err:
        _announce(_exit_status(err))
        raise
    _announce(None)
    return value


def show(text: str) -> None:
    """Print `text` on the main process only (one summary, not one per process)."""
    if is_main():
        print(text, flush=True)


# ----------------------------------------------------------------------------- the global batch
def _collective() -> bool:
    """In-batch collectives run: several processes, all of them computing (not in a section)."""
    return world_size() > 1 and _initialized() and not in_section()


def _gather(x: Tensor, sizes: list[int]) -> Tensor:
    """`x` of every process concatenated along dim 0 in rank order (row counts `sizes`)."""
    if x.dtype == torch.bool:  # gloo has no bool all_gather
        return _gather(x.to(torch.uint8), sizes).bool()
    longest = max(sizes)
    x = x.contiguous()
    if x.shape[0] < longest:  # all_gather needs one shape: pad, then cut each part back
        x = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]
    torch.distributed.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns the local shard's gradient times the number of processes.

    Every process computes the same loss on the same gathered batch, so process r's gradient for its
    shard is dL/dshard_r; the engine (like DDP) averages parameter gradients over the N processes,
    hence the factor N: the average is then the one-process gradient of L. Equivalent to open_clip's
    `gather_with_grad=True` + a loss over the whole gathered batch (its backward reduce-sums N equal
    copies), without the backward communication."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], index: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.index = sizes, index
        return _gather(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        start = sum(ctx.sizes[: ctx.index])
        return grad[start : start + ctx.sizes[ctx.index]] * len(ctx.sizes), None, None


def gather_batch(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The global batch: each tensor (rows = this process's samples) concatenated over processes in
    rank order, which is the one-process batch order under the engine's data split.

    Follows open_clip's `gather_features` (src/open_clip/loss.py, `local_loss=False`): every process
    computes the loss on the whole gathered batch. Gradients reach the local rows only, scaled by the
    number of processes so that averaged gradients (the engine, DDP) equal the one-process gradient
    (`_GatherWithGrad`). Tensors without grad (ids, masks) are gathered plainly; None stays None.
    One process, or inside `on_main`: the tensors are returned as they are."""
    present = [t for t in tensors if t is not None]
    if not present or not _collective():
        return tensors
    counts = torch.tensor([present[0].shape[0]], device=present[0].device)
    every = [torch.zeros_like(counts) for _ in range(world_size())]
    torch.distributed.all_gather(every, counts)
    sizes = [int(c) for c in every]
    me = rank()
    out: list[Tensor | None] = []
    for t in tensors:
        if t is None:
            out.append(None)
        elif t.requires_grad:
            out.append(_GatherWithGrad.apply(t, sizes, me))
        else:
            out.append(_gather(t, sizes))
    return tuple(out)


def mean_weight(rows: int) -> float:
    """`processes x rows / rows of all processes`. A loss that is a mean over this process's `rows`
    rows, times this weight, averages over the processes (as the engine averages losses and
    gradients) to the mean over every row of the global batch. 1.0 in one process, inside a section,
    or when every process has as many rows; it matters for means over a varying count, e.g. per-frame
    terms over videos of different lengths."""
    if not _collective():
        return 1.0
    init()
    count = torch.tensor([float(rows)])
    torch.distributed.all_reduce(count, group=_state["control"])  # gloo: a CPU tensor whatever the backend
    return world_size() * rows / float(count) if float(count) > 0 else 1.0


# ----------------------------------------------------------------------------- BatchNorm over the global batch
class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the backward sums the gradients likewise (every process's loss depends on
    the global statistics)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        torch.distributed.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class _SyncedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Mixed in behind a BatchNorm class (`synced_batchnorm`): in training, with several processes
    computing, mean and variance come from the global batch (two passes: sum, then squared deviations),
    and the running statistics are updated with them, as `torch.nn.SyncBatchNorm` does; otherwise the
    class's own forward runs. Unlike `torch.nn.SyncBatchNorm` it runs on CPUs (gloo) and keeps
    subclasses' own forward (the side networks' `TokenBatchNorm` transposes around it)."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _collective()):
            return super().forward(x)
        self._check_input_dim(x)
        dtype, x = x.dtype, x.float()  # statistics in float32 whatever the autocast dtype
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
        return y.to(dtype)


_SYNCED: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if cls not in _SYNCED:
        _SYNCED[cls] = type(f"Synced{cls.__name__}", (cls, _SyncedBatchNorm), {"__module__": cls.__module__})
    return _SYNCED[cls]


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module) -> Iterator[int]:
    """Every BatchNorm of `model` computes training statistics over the global batch while inside;
    the classes are restored on exit (exports, state dicts and later runs see the plain modules).
    Yields the number of BatchNorm modules switched (none in one process)."""
    switched: list[tuple[nn.Module, type]] = []
    if world_size() > 1:
        for m in model.modules():
            # torch's own SyncBatchNorm has its own forward (GPU only): left as it is
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (_SyncedBatchNorm,
                                                                                    nn.SyncBatchNorm)):
                switched.append((m, type(m)))
                m.__class__ = _synced_class(type(m))
    try:
        yield len(switched)
    finally:
        for m, cls in switched:
            m.__class__ = cls
