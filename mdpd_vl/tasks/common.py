"""Plumbing shared by the task recipes: CLI flags -> config overrides, timing, result files."""

from __future__ import annotations

import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdpd_vl.engine.config import atomic_write_text
from mdpd_vl.errors import UserError


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so that methods compared in one run see identical data and init."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def command_line(argv: Sequence[str] | None = None, module: str | None = None) -> str:
    """The exact command that started this run, for results files and model cards."""
    args = list(sys.argv[1:] if argv is None else argv)
    prog = f"python -m {module}" if module else shlex.quote(sys.argv[0])
    return " ".join([prog, *(shlex.quote(a) for a in args)])


def data_root(given: str | None) -> Path:
    """`--data-root`, else `$MDPD_DATA`, else `./data`."""
    return Path(given or os.environ.get("MDPD_DATA") or "data")


def cache_dir(given: str | None, root: Path) -> Path:
    """`data.cache_dir`, else `$MDPD_CACHE`, else `<data root>/cache`."""
    return Path(given or os.environ.get("MDPD_CACHE") or root / "cache")


def check_output_dir(path: str | Path) -> Path:
    """Create the output folder (or fail with one line naming it)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write the output folder ({err.strerror})", where=str(path)) from None
    return path


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` (CUDA-synchronised when a GPU is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Atomic, indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------- errors in the user's words
def flag_overrides(args: Any, flags: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """`--flag value` options as `key=value` overrides, and the label of each: what the user typed.

    `flags` maps an argparse dest (`method`) to its config key (`method.name`). The labels let
    `user_words` report `--method nonsense`, not a `--set method.name=nonsense` nobody wrote."""
    overrides, labels = [], {}
    for dest, key in flags.items():
        value = getattr(args, dest)
        if value is None:
            continue
        text = "true" if value is True else "false" if value is False else str(value)
        overrides.append(f"{key}={text}")
        option = "--" + dest.replace("_", "-")
        labels[key] = option if isinstance(value, bool) else f"{option} {value}"
    return overrides, labels


def set_labels(overrides: Sequence[str]) -> dict[str, str]:
    """Config key -> `--set key=value` for the user's own `--set` options."""
    return {item.partition("=")[0].strip(): f"--set {item}" for item in overrides}


def relabel(err: UserError, labels: Mapping[str, str]) -> UserError:
    """`err` in the user's words: a config key that came from an option is named by that option.

    An error the config loader attributed to a generated `--set key=value`, or one raised later
    with only a field, gets the option the user typed as its place (and drops a field that merely
    repeats the option's config key)."""
    prefix = ": ".join(p for p in (err.where, err.field) if p)
    message = str(err)[len(prefix) + 2:] if prefix else str(err)
    key = err.field if err.field in labels else None
    if key is None and err.where and err.where.startswith("--set "):
        generated = err.where[len("--set "):].partition("=")[0].strip()
        key = generated if generated in labels else None
    if key is None or (err.where and not err.where.startswith("--set ")):
        return err
    if labels[key].startswith("--set "):
        return UserError(message, where=labels[key], field=err.field)
    return UserError(message, where=labels[key], field=None if err.field == key else err.field)
