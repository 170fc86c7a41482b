"""Memory measurement used by the benchmark and every task. Units: GiB = 1024**3 bytes, labelled.

- **The figure**: `train_peak_bytes`, the peak of live tensor bytes over one training step
  (forward, backward, optimiser step), with the semantics of `torch.cuda.max_memory_allocated`:
  everything alive at that moment counts (parameters, buffers such as an EMA teacher's, inputs,
  gradients, optimiser state, saved activations, forward/backward temporaries, checkpoint
  recomputation). On CUDA it is read from the allocator (`reset_peak_memory_stats` /
  `max_memory_allocated`, which also counts allocator rounding to 512-byte blocks and library
  workspaces); elsewhere `LiveTensorBytes` tracks every storage that ATen creates and frees
  (a `TorchDispatchMode` over all ops, weak references to the storages) from a baseline of the
  tensors alive at the start. `measure_train_state` returns it as "train_peak_bytes".
- Breakdown of the training state, exact on any device: what autograd saves for backward
  (`SavedTensorsMeter`), gradient bytes, optimizer-state bytes and their sum `train_state_bytes`
  (never alive all at once: gradients replace saved activations during backward).
- Process peaks: `PeakMemory` (max allocated on GPU, resident-set growth on CPU), kept for
  whole-phase figures that include allocator slack.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 1024**3


def gib(num_bytes: float, digits: int = 2) -> str:
    """'1.23 GiB' (1 GiB = 1024**3 bytes)."""
    return f"{num_bytes / GIB:.{digits}f} GiB"


def _storage_key(t: Tensor) -> tuple[str, int, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr(), s.nbytes())


def _tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage shared by views counts once)."""
    seen: dict[tuple[str, int, int], int] = {}
    for t in tensors:
        try:
            key = _storage_key(t)
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage (e.g. wrappers)
            key = ("id", id(t), t.nelement() * t.element_size())
        seen.setdefault(key, key[2])
    return sum(seen.values())


class SavedTensorsMeter:
    """Counts the bytes autograd saves for backward while the context is open.

    Every distinct storage is counted once and whole (a saved view keeps its whole storage alive).
    Storages of `exclude` tensors, normally the model's parameters, are not counted: they live in
    memory whether or not backward needs them, so they belong to `param_bytes`, not to the cost of
    the graph. Run the forward inside the context and backward after it: once a graph is freed, a
    new tensor may reuse a counted address.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()):
        self._excluded = {_storage_key(t)[:2] for t in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self._ctx: Any = None

    @property
    def bytes(self) -> int:
        """Bytes saved for backward so far."""
        return sum(self._seen.values())

    @property
    def count(self) -> int:
        """Number of distinct storages saved so far."""
        return len(self._seen)

    def _pack(self, t: Tensor) -> Tensor:
        try:
            key = _storage_key(t)
            nbytes = key[2]
            short: tuple[str, int] = key[:2]
        except (RuntimeError, NotImplementedError):
            short, nbytes = ("id", id(t)), t.nelement() * t.element_size()
        if short not in self._excluded:
            self._seen[short] = max(nbytes, self._seen.get(short, 0))
        return t

    def __enter__(self) -> SavedTensorsMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    out, seen = [], set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the given parameters (each counted once)."""
    return sum(p.nelement() * p.element_size() for p in _unique(params))


def grad_bytes(params: Iterable[Tensor]) -> int:
    """Bytes of the `.grad` tensors the given parameters hold now (None counts 0)."""
    return sum(p.grad.nelement() * p.grad.element_size() for p in _unique(params) if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (AdamW: exp_avg + exp_avg_sq + a step scalar each)."""
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    return _tensor_bytes(tensors)


class LiveTensorBytes(TorchDispatchMode):
    """Exact peak of live tensor bytes while open: every storage an ATen op creates counts until it is
    freed; `baseline` tensors (what is alive at entry: parameters, buffers, inputs, ...) count from
    the start and stop counting when they are freed (e.g. gradients set to None).

    A storage counts once and whole, however many views share it; zero-size storages count 0.
    Frees are noticed lazily: only when the tracked figure would pass the peak are dead storages
    swept, which keeps the peak exact (the tracked figure never undercounts) and the cost low.
    Not seen: memory a kernel allocates for itself (library workspaces) and tensors made outside
    ATen (e.g. `torch.from_numpy`).
    """

    def __init__(self, baseline: Iterable[Tensor] = ()):
        super().__init__()
        self._live: dict[tuple[str, int], tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        for t in baseline:
            self._add(t)
        self.baseline_bytes = self.current_bytes
        self.peak_bytes = self.current_bytes

    def _add(self, t: Tensor) -> None:
        try:
            storage = t.untyped_storage()
            nbytes, ptr = storage.nbytes(), storage.data_ptr()
        except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, wrapper tensors
            return
        if nbytes == 0 or ptr == 0:
            return
        key = (str(t.device), ptr)
        ref = StorageWeakRef(storage)
        known = self._live.get(key)
        if known is not None:
            if not known[0].expired() and known[0].cdata == ref.cdata:
                return  # a view or an in-place result: the storage is already counted
            self.current_bytes -= known[1]  # that storage died and its address was reused
        self._live[key] = (ref, nbytes)
        self.current_bytes += nbytes

    def sweep(self) -> int:
        """Forget storages that were freed; returns the bytes alive now."""
        dead = [k for k, (ref, _) in self._live.items() if ref.expired()]
        for k in dead:
            self.current_bytes -= self._live.pop(k)[1]
        return self.current_bytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self._add(t)
        if self.current_bytes > self.peak_bytes and self.sweep() > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        return out


def _state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None, inputs: Any) -> list[Tensor]:
    """What is alive at the start of a step: parameters, buffers, gradients, optimiser state, inputs."""
    out: list[Tensor] = [*model.parameters(), *model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for group in optimizer.param_groups:
            out += [p for p in group["params"]] + [p.grad for p in group["params"] if p.grad is not None]
        out += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor)]
    out += [t for t in tree_flatten(_tensors_of(inputs))[0] if isinstance(t, Tensor)]
    return out


def _tensors_of(x: Any) -> Any:
    layers = getattr(x, "layers", None)  # backbones.base.Precomputed
    return ([*layers, getattr(x, "mask", None)] if layers is not None else x)


def _cuda_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        if p.device.type == "cuda":
            return p.device
    return None


def train_peak_bytes(
    model: nn.Module,
    step: Callable[[], Any],
    optimizer: torch.optim.Optimizer | None = None,
    inputs: Any = None,
    device: torch.device | str | None = None,
) -> tuple[int, str]:
    """(peak bytes, kind) of running `step()` (one forward, backward and optimiser step).

    CUDA (the model's device, or `device`): `max_memory_allocated` after a peak reset, kind
    'cuda_max_memory_allocated'. Otherwise `LiveTensorBytes` from a baseline of the model's
    parameters and buffers, existing gradients, the optimiser's state and `inputs`, kind
    'live_tensor_bytes'.
    """
    dev = torch.device(device) if device is not None else _cuda_device(model)
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev)), "cuda_max_memory_allocated"
    with LiveTensorBytes(_state_tensors(model, optimizer, inputs)) as meter:
        step()
    return meter.peak_bytes, "live_tensor_bytes"


def measure_train_state(
    model: nn.Module,
    closure: Callable[[], Tensor | Mapping[str, Tensor]],
    params: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    inputs: Any = None,
) -> dict[str, Any]:
    """One real training step (forward in a meter, backward, optimizer step); its memory bill in bytes.

    `closure()` runs the forward and returns the loss (or a dict with "loss"); `inputs` are the
    batch tensors it reads (alive during the step, so they count in the peak, as on a GPU).
    Returns train_peak_bytes (the peak of live bytes over the whole step, see `train_peak_bytes`)
    and peak_kind, and the breakdown: saved_bytes, grad_bytes, optim_bytes, train_state_bytes
    (their sum) and param_bytes (all model parameters). The step changes the weights, like any
    training step.
    """
    params = _unique(params)
    optimizer.zero_grad(set_to_none=True)
    found: dict[str, int] = {}

    def step() -> None:
        with SavedTensorsMeter(exclude=[*model.parameters(), *params]) as meter:
            out = closure()
        loss = out["loss"] if isinstance(out, Mapping) else out
        loss.backward()
        found["grads"] = grad_bytes(params)
        optimizer.step()
        found["saved"] = meter.bytes
        del out, loss

    peak, kind = train_peak_bytes(model, step, optimizer, inputs)
    optim = optimizer_state_bytes(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return {
        "train_peak_bytes": peak,
        "peak_kind": kind,
        "saved_bytes": found["saved"],
        "grad_bytes": found["grads"],
        "optim_bytes": optim,
        "train_state_bytes": found["saved"] + found["grads"] + optim,
        "param_bytes": param_bytes(model.parameters()),
    }


# ----------------------------------------------------------------------------- process / device peaks


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; getrusage where /proc is absent)."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return peak_rss_bytes()  # no better source on this platform: an upper bound


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False when impossible."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a phase. GPU: `max_memory_allocated` after a reset at entry. CPU: peak RSS
    (reset at entry where Linux allows) minus the RSS at entry. `exact` is False when the CPU peak
    could not be reset, so an earlier, higher peak may show through.

    Fields after exit: `kind`, `baseline_bytes`, `peak_bytes` (absolute), `increase_bytes`.
    """

    def __init__(self, device: torch.device | str | None = None):
        dev = torch.device(device) if device is not None else None
        if dev is None:
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        self.device = dev
        self.kind = "cuda_allocated" if dev.type == "cuda" else "cpu_rss"
        self.baseline_bytes = self.peak_bytes = self.increase_bytes = 0
        self.exact = True

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.exact = _reset_peak_rss()
            self.baseline_bytes = current_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = max(peak_rss_bytes(), current_rss_bytes())
        self.increase_bytes = max(0, self.peak_bytes - self.baseline_bytes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary with bytes and labelled GiB strings."""
        return {
            "kind": self.kind,
            "device": str(self.device),
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "increase_bytes": self.increase_bytes,
            "peak": gib(self.peak_bytes),
            "increase": gib(self.increase_bytes),
            "exact": self.exact,
        }
