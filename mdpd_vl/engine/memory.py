"""Memory measurement used by the benchmark and every task. Units: GiB = 1024**3 bytes, labelled.

- Exact training-state bytes on any device: what autograd saves for backward
  (`SavedTensorsMeter`), gradient bytes, optimizer-state bytes; `measure_train_state` does one real
  step and returns all three and their sum (`train_state_bytes`, the figure the benchmark reports).
- Peaks: `PeakMemory` is `max_memory_allocated` with the peak stats reset at entry on GPU, and the
  process resident-set growth over the entry baseline on CPU (`peak_rss_bytes` / `current_rss_bytes`).
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

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


def measure_train_state(
    model: nn.Module,
    closure: Callable[[], Tensor | Mapping[str, Tensor]],
    params: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
) -> dict[str, int]:
    """One real training step (forward in a meter, backward, optimizer step); its memory bill in bytes.

    `closure()` runs the forward and returns the loss (or a dict with "loss"). Returns saved_bytes,
    grad_bytes, optim_bytes, train_state_bytes (their sum) and param_bytes (all model parameters).
    The step changes the weights, like any training step.
    """
    params = _unique(params)
    optimizer.zero_grad(set_to_none=True)
    with SavedTensorsMeter(exclude=[*model.parameters(), *params]) as meter:
        out = closure()
    loss = out["loss"] if isinstance(out, Mapping) else out
    loss.backward()
    grads = grad_bytes(params)
    optimizer.step()
    optim = optimizer_state_bytes(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return {
        "saved_bytes": meter.bytes,
        "grad_bytes": grads,
        "optim_bytes": optim,
        "train_state_bytes": meter.bytes + grads + optim,
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
