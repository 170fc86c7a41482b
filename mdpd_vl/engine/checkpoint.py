"""The run folder: checkpoints that lose nothing (atomic on disk, exact on resume), metrics, config.

Layout: `<run_dir>/checkpoints/step-00000120/` with
- `model.safetensors`: the trainable parameters and the persistent buffers (frozen weights are not
  stored: the caller rebuilds them, e.g. from the pre-trained backbone);
- `state.pt`: optimizer, scheduler, data position and run facts (read with `weights_only=True`);
- `rng-<rank>.pt`: python / numpy / torch (/ cuda) RNG states of each process, as tensors and lists.
Several processes: the main process writes all of it (the RNG states are gathered to it); the
others never write into the run folder.
A checkpoint is written into a hidden temp folder and renamed into place, so a folder named
`step-*` is always complete; a run killed while saving leaves the previous one intact, and the next
save removes the leftover temp folder. Only finite weights are saved (`NonFiniteError` otherwise),
so every `step-*` folder is a good one. A failed write (full disk) removes its temp folder and is one
`mdpd_vl.atomic.WriteError` line naming the file and the bytes the checkpoint needs.
`state.pt` also records the run's settings (`run_settings`); a resume compares them with the
current ones (`settings_diff`): only those matching `RESUME_FREE` may change.
Next to them: `metrics.jsonl` (one JSON object per logged step; + `tb/` when TensorBoard is
installed) and `config.json` (the resolved config, the seed and the run's facts).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdpd_vl import atomic, dist
from mdpd_vl.engine.config import TrainConfig, atomic_write_text, dump_config
from mdpd_vl.errors import UserError

CKPT_SUBDIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")
_PARTIAL = re.compile(r"^\.(tmp|old)-step-\d{8,}$")
FORMAT = "mdpd_vl.checkpoint"
VERSION = 1
# Settings a resumed run may change (fnmatch patterns over dotted keys): how long it runs (a longer
# run stretches the decay over the new total), how it logs, checkpoints and evaluates, where its
# files and data live. Everything else a checkpoint's state depends on must match.
RESUME_FREE: tuple[str, ...] = (
    "train.epochs", "train.max_steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
    "train.eval_every", "train.num_workers", "output_dir", "*.root", "*cache_dir", "*eval_*", "*.folds",
)


class NonFiniteError(UserError):
    """Training produced NaN/inf (loss, gradient norm or weights); nothing non-finite was saved.
    The message names the step and the last good checkpoint."""


def check_run_dir(run_dir: str | Path) -> Path:
    """Create the run folder if needed and prove it is readable and writable (else a UserError)."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        list(path.iterdir())
        probe = atomic.temp_path(path / "write-probe")
        probe.touch(exist_ok=False)
        probe.unlink()
        atomic.clean_stale(path)
    except OSError as err:
        reason = err.strerror or err.__class__.__name__
        raise UserError(f"run folder is not usable ({reason})", where=str(path)) from None
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(run_dir) / CKPT_SUBDIR
    try:
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    except OSError as err:
        raise UserError(
            f"cannot read the checkpoint folder ({err.strerror or err})", where=str(root)
        ) from None
    return [p for _, p in sorted(found)]


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Remove the temp folders of checkpoints whose writing was killed or failed; returns them."""
    root = Path(run_dir) / CKPT_SUBDIR
    found = [p for p in root.iterdir() if _PARTIAL.match(p.name)] if root.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `run_dir`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(run_dir: Path, resume: bool | str | Path | None) -> Path | None:
    """Which checkpoint to start from: 'auto' = newest in run_dir if any; True = newest, required;
    a path = that checkpoint folder (or a file in it, or a run folder), required; None/False = none."""
    if resume is None or resume is False:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    if resume is True:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UserError("no checkpoint to resume from", where=str(run_dir / CKPT_SUBDIR))
        return found
    path = Path(resume)
    if path.is_file():
        path = path.parent
    if (path / "state.pt").is_file():
        return path
    if path.is_dir() and (found := latest_checkpoint(path)) is not None:
        return found
    reason = "checkpoint not found" if not path.exists() else "not a checkpoint (no state.pt)"
    raise UserError(reason, where=str(resume))


# ----------------------------------------------------------------------------- run folder files


def write_run_config(
    run_dir: Path, cfg: TrainConfig, config: Mapping[str, Any] | None, facts: dict[str, Any]
) -> None:
    """Write the resolved config, the seed and run facts to `run_dir/config.json` (atomically)."""
    content = {"seed": cfg.seed, **facts, "train": dump_config(cfg)}
    if config is not None:
        content["config"] = dict(config)
    atomic_write_text(run_dir / "config.json", json.dumps(content, indent=2, default=str) + "\n")


class MetricsLog:
    """metrics.jsonl in the run folder (+ TensorBoard when importable); main process only.
    A line that cannot be written whole (full disk) is cut off again: the file stays valid JSONL."""

    def __init__(self, run_dir: Path, active: bool, resume_step: int | None):
        self.path, self.active, self.tb = run_dir / "metrics.jsonl", active, None
        if not active:
            return
        kept = []
        if resume_step is not None and self.path.is_file():  # drop lines the resumed run re-logs
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
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
        line = (json.dumps({"step": step, **values}) + "\n").encode("utf-8")
        try:
            with open(self.path, "ab") as fh:
                start = fh.tell()
                try:
                    fh.write(line)
                    fh.flush()
                except OSError:
                    with contextlib.suppress(OSError):
                        fh.truncate(start)
                    raise
        except OSError as err:
            raise atomic.write_error(err, self.path, len(line)) from None
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- resume settings


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys (`train.lr`); empty mappings stay leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_settings(cfg: TrainConfig, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The run's settings as dotted keys (`train.lr`, `method.name`, ...) with JSON-plain values: the
    recipe's config (when given) with the engine's own `TrainConfig` over its `train` section."""
    flat = flatten(dict(config or {}))
    flat.update(flatten({"train": dump_config(cfg)}))
    return json.loads(json.dumps(flat, default=str))


_UNSET = "(unset)"


def settings_diff(
    saved: Mapping[str, Any], now: Mapping[str, Any], free: Iterable[str] = RESUME_FREE
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(fixed, changed): the keys whose values differ between a checkpoint and this run, as
    (key, saved, now), split by whether a resume must refuse them or may apply them (`free`)."""
    patterns = tuple(free)
    fixed, changed = [], []
    # dotted config keys first (what the user set), then the engine's own facts (groups, sizes)
    for key in sorted(set(saved) | set(now), key=lambda k: ("." not in k or k.startswith("groups["), k)):
        old, new = saved.get(key, _UNSET), now.get(key, _UNSET)
        if old == new and type(old) is type(new):
            continue
        if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool) \
                and not isinstance(new, bool) and float(old) == float(new):
            continue  # 1 and 1.0: one value
        (changed if any(fnmatch.fnmatchcase(key, p) for p in patterns) else fixed).append((key, old, new))
    return fixed, changed


def group_hparams(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Each group's own hyper-parameters as set up (peak lr, before any schedule), by group name."""
    return {g["name"]: {"lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"],
                        "betas": list(g["betas"]), "eps": g["eps"]} for g in optimizer.param_groups}


def resume_facts(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Everything a resume must match (or may change), as dotted keys: run settings, process count,
    data size, the param groups and their hyper-parameters (from a checkpoint's or a run's meta)."""
    facts = dict(meta.get("settings", {}))
    for key in ("world_size", "dataset_len", "groups", "group_sizes"):
        facts[key] = meta.get(key)
    for name, hp in (meta.get("group_hparams") or {}).items():
        facts.update({f"groups[{name}].{k}": v for k, v in hp.items()})
    return json.loads(json.dumps(facts, default=str))


def check_resume(path: Path, saved: Mapping[str, Any], now: Mapping[str, Any],
                 free: Iterable[str] = RESUME_FREE) -> list[tuple[str, Any, Any]]:
    """Refuse (one UserError line naming every key) a resume from checkpoint `path` whose meta `saved`
    differs from this run's `now` outside `free`; returns the free keys that changed."""
    if "settings" not in saved:  # written before settings were recorded: compare the keys it has
        for key in ("world_size", "batch_size", "grad_accum", "seed", "dataset_len", "groups", "group_sizes"):
            if saved.get(key) != now.get(key):
                raise UserError(f"checkpoint was written with {key}={saved.get(key)!r}, this run has "
                                f"{now.get(key)!r}; resume with the same settings or use a fresh run folder",
                                where=str(path), field=key)
        return []
    fixed, changed = settings_diff(resume_facts(saved), resume_facts(now), free)
    if fixed:
        raise UserError(
            f"this run's settings differ from the checkpoint's: {describe_diff(fixed)}; resume with the "
            f"checkpoint's values, or start afresh in another run folder (or remove {path.parent})",
            where=str(path),
        )
    return changed


def describe_diff(diff: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """`key (checkpoint A, now B), ...` for an error line."""
    parts = [f"{k} (checkpoint {old!r}, now {new!r})" for k, old, new in diff[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(parts) + more


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """All RNG states of this process, as tensors / lists / numbers (loadable with weights_only)."""
    version, internal, gauss = random.getstate()
    np_name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((np_name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- model tensors


def model_tensors(model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: trainable parameters + persistent buffers, by name."""
    keys = set(model.state_dict().keys())
    out = {name: p for name, p in trainable.items()}
    out.update({name: b for name, b in model.named_buffers() if name in keys})
    return out


def non_finite(tensors: Mapping[str, torch.Tensor]) -> tuple[int, int, str | None]:
    """(non-finite values, all floating values, first offending name) over `tensors`."""
    bad, total, first = 0, 0, None
    with torch.no_grad():
        for name, t in tensors.items():
            if not t.is_floating_point():
                continue
            n = int((~torch.isfinite(t)).sum())
            total += t.numel()
            if n:
                bad += n
                first = first or name
    return bad, total, first


def _serialise(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: nn.Module,
    trainable: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: Mapping[str, int],
    meta: Mapping[str, Any],
    rank: int = 0,
    keep: int = 1,
) -> Path:
    """Write checkpoint `step` atomically. Every process calls this; the main process alone writes,
    with every process's RNG state (`rng-<rank>.pt`, gathered), while the others wait.

    Refuses non-finite weights (`NonFiniteError`, every process alike: the weights are the same on
    all). A failed write removes the temp folder and raises a `WriteError` naming the bytes needed
    (on the main process; the others stop with its exit status)."""
    root = run_dir / CKPT_SUBDIR
    final = root / f"step-{step:08d}"
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model_tensors(model, trainable).items()}
    bad, total, first = non_finite(tensors)
    if bad:
        good = latest_checkpoint(run_dir)
        raise NonFiniteError(
            f"weights are not finite after step {step} ({bad:,} of {total:,} values, first in {first}); "
            f"not saved; last good checkpoint: {good or 'none'} (lower the lr or check the inputs)",
            where=str(run_dir),
            field="weights",
        )
    rngs = dist.all_gather_object(rng_state())  # rank order; [this process's] alone
    state = {"format": FORMAT, "version": VERSION, "position": dict(position), "meta": dict(meta),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    dist.on_main(_write_checkpoint, run_dir, final, tensors, state, rngs, keep)
    return final


def _write_checkpoint(run_dir: Path, final: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                      rngs: list[Any], keep: int) -> None:
    """Write into a hidden temp folder, rename it into place, then drop all but the `keep` newest."""
    from safetensors.torch import save as st_save

    root = final.parent
    tmp, old = root / f".tmp-{final.name}", root / f".old-{final.name}"
    blobs = {"model.safetensors": st_save(tensors), "state.pt": _serialise(state)}
    blobs.update({f"rng-{r}.pt": _serialise(rng) for r, rng in enumerate(rngs)})
    try:
        root.mkdir(exist_ok=True)
        remove_partial(run_dir)
        tmp.mkdir()
        for name, blob in blobs.items():
            _write_file(tmp / name, blob)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise atomic.write_error(err, final, sum(map(len, blobs.values()))) from None
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        os.replace(final, old)
    os.replace(tmp, final)
    atomic.fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)


def tensors_digest(model: nn.Module, trainable: Mapping[str, nn.Parameter]) -> str:
    """sha1 of what a checkpoint stores of the model (names, shapes, bytes): equal across processes
    that are in step."""
    import hashlib

    h = hashlib.sha1()
    for name, t in sorted(model_tensors(model, trainable).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_file(path: Path, blob: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError("checkpoint file missing", where=str(path)) from None
    except Exception as err:  # a truncated / foreign file: one line, not a pickle traceback
        raise UserError(f"cannot read checkpoint ({err.__class__.__name__})", where=str(path)) from None


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    trainable: Mapping[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int = 0,
    check_meta: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Restore model tensors, optimizer, scheduler and this rank's RNG; return position and meta.

    Everything is validated (`check_meta(meta)`, names, shapes) before anything is modified."""
    from safetensors.torch import load_file

    state = _read(path / "state.pt")
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("meta"), dict):
        raise UserError("not an mdpd_vl checkpoint", where=str(path / "state.pt"))
    if check_meta is not None:
        check_meta(state["meta"])
    weights_file = path / "model.safetensors"
    try:
        saved = load_file(str(weights_file))
    except Exception as err:
        raise UserError(f"cannot read weights ({err.__class__.__name__})", where=str(weights_file)) from None
    bad, total, first = non_finite(saved)
    if bad:  # written before checkpoints were checked: resuming it would train NaN again
        raise UserError(
            f"holds {bad:,} non-finite weights of {total:,} (first in {first}); it cannot be resumed: "
            f"remove it, or start afresh in another run folder",
            where=str(weights_file),
        )
    targets = model_tensors(model, trainable)
    missing, unexpected = sorted(set(targets) - set(saved)), sorted(set(saved) - set(targets))
    if missing or unexpected:
        raise UserError(
            f"does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}",
            where=str(weights_file),
        )
    for name, tensor in saved.items():
        if targets[name].shape != tensor.shape:
            raise UserError(
                f"shape {tuple(tensor.shape)} != model {tuple(targets[name].shape)}",
                where=str(weights_file),
                field=name,
            )
    rng = _read(path / f"rng-{rank}.pt")
    with torch.no_grad():
        for name, tensor in saved.items():
            targets[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(rng)
    return {"position": state["position"], "meta": state["meta"]}
