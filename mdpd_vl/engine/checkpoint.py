"""The run folder: checkpoints that lose nothing (atomic on disk, exact on resume), metrics, config.

Layout: `<run_dir>/checkpoints/step-00000120/` with
- `model.safetensors`: the trainable parameters and the persistent buffers (frozen weights are not
  stored: the caller rebuilds them, e.g. from the pre-trained backbone);
- `state.pt`: optimizer, scheduler, data position and run facts (read with `weights_only=True`);
- `rng-<rank>.pt`: python / numpy / torch (/ cuda) RNG states of each process, as tensors and lists.
A checkpoint is written into a hidden temp folder and renamed into place, so a folder named
`step-*` is always complete; a run killed while saving leaves the previous one intact.
Next to them: `metrics.jsonl` (one JSON object per logged step; + `tb/` when TensorBoard is
installed) and `config.json` (the resolved config, the seed and the run's facts).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mdpd_vl.engine.config import TrainConfig, atomic_write_text, dump_config
from mdpd_vl.errors import UserError

CKPT_SUBDIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8,})$")
FORMAT = "mdpd_vl.checkpoint"
VERSION = 1


def check_run_dir(run_dir: str | Path) -> Path:
    """Create the run folder if needed and prove it is readable and writable (else a UserError)."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        list(path.iterdir())
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
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


def _fsync_write(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


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
    barrier: Callable[[], None] = lambda: None,
    keep: int = 1,
) -> Path:
    """Write checkpoint `step` atomically (every rank calls this; rank 0 writes the shared parts)."""
    from safetensors.torch import save as st_save

    root = run_dir / CKPT_SUBDIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        root.mkdir(exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _fsync_write(tmp / f"rng-{rank}.pt", lambda fh: torch.save(rng_state(), fh))
    if rank == 0:
        tensors = {
            k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in model_tensors(model, trainable).items()
        }
        _fsync_write(tmp / "model.safetensors", lambda fh: fh.write(st_save(tensors)))
        state = {
            "format": FORMAT,
            "version": VERSION,
            "position": dict(position),
            "meta": dict(meta),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        _fsync_write(tmp / "state.pt", lambda fh: torch.save(state, fh))
    barrier()
    if rank == 0:
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


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
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError("not an mdpd_vl checkpoint", where=str(path / "state.pt"))
    if check_meta is not None:
        check_meta(state["meta"])
    weights_file = path / "model.safetensors"
    try:
        saved = load_file(str(weights_file))
    except Exception as err:
        raise UserError(f"cannot read weights ({err.__class__.__name__})", where=str(weights_file)) from None
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
