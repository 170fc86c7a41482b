"""Export a faded model (backbone + W_B) as `model.safetensors` + `config.json`, and load it back.

`FadedModel` (what `DualPath.fade()` returns) lives here, in a module that imports no side,
distillation or tuning code. The checkpoint holds only backbone and head tensors: no side
network, bottleneck, generation block or mask token exists in a `FadedModel`, so none can be
saved. `load_exported` rebuilds the backbone from its `spec()` through
`mdpd_vl.backbones.build_backbone` (random init, no download) and the head from its head spec,
then loads the weights strictly; no side or distillation module is imported.

A task export (`export_task`) is a folder of such parts plus a `config.json` with the task, the
parts and the preprocessing the model was evaluated with; `load_exported` gives it back as the
task's deployed model (`mdpd_vl.deploy.DEPLOYED[task]`, e.g. ITR's `ImageTextRetriever` with
`encode_images` / `encode_texts`). `load_exported` of a single part folder gives the `FadedModel`.

Head spec: a head may define `spec() -> {"target": "mdpd_vl.<module>:<Class>", "kwargs": {...}}`;
`GAPLinear` is derived here. Only targets inside `mdpd_vl` are imported when loading, so a
config file cannot make us import arbitrary code.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mdpd_vl.atomic import tensor_bytes
from mdpd_vl.atomic import write_with as _atomic_write  # temp file + rename; full disk = one line
from mdpd_vl.backbones.base import Backbone
from mdpd_vl.errors import UserError

FORMAT = "mdpd_vl.faded"
TASK_FORMAT = "mdpd_vl.task"  # a task export: parts + preprocessing, loaded through mdpd_vl.deploy
VERSION = 1
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class FadedModel(nn.Module):
    """What runs at inference after fading: backbone (with its tuned norms) + W_B, nothing else."""

    def __init__(self, backbone: Backbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Any) -> Tensor:
        feats = self.backbone.features(x)
        return self.head(feats[-1], self.backbone.padding_mask(x))


def is_plain(module: nn.Module) -> bool:
    """A `FadedModel` whose backbone has its own architecture (no peft tuner layer or adapter in it): what
    `export_faded` writes and `load_faded` rebuilds from the backbone's spec."""
    if type(module) is not FadedModel:
        return False
    from mdpd_vl.tuning.adapter import Adapted  # export time only: loading never calls this

    if any(isinstance(m, Adapted) for m in module.modules()):
        return False  # Houlsby adapters are ours, not peft's, and are not in the backbone's spec
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft no tuner layer can exist
        return True
    return not any(isinstance(m, BaseTunerLayer) for m in module.modules())


def head_spec(head: nn.Module) -> dict[str, Any]:
    """The recipe that rebuilds `head` (see module docstring)."""
    from mdpd_vl.heads.pooling import GAPLinear

    if hasattr(head, "spec"):
        spec = head.spec()
    elif type(head) is GAPLinear:
        spec = {
            "target": "mdpd_vl.heads.pooling:GAPLinear",
            "kwargs": {"in_width": head.fc.in_features, "out_dim": head.fc.out_features},
        }
    else:
        raise ValueError(
            f"cannot export head {type(head).__name__}: give it a spec() -> "
            "{'target': 'mdpd_vl.<module>:<Class>', 'kwargs': {...}}"
        )
    if not str(spec.get("target", "")).startswith("mdpd_vl."):
        raise ValueError(f"head spec target must live in mdpd_vl, got {spec.get('target')!r}")
    return spec


def build_head(spec: dict[str, Any], where: str | None = None) -> nn.Module:
    """Rebuild a head from `head_spec` output (targets outside mdpd_vl are refused)."""
    target = str(spec.get("target", ""))
    module, _, attr = target.partition(":")
    if not module.startswith("mdpd_vl.") or not attr:
        raise UserError(f"head target must be 'mdpd_vl.<module>:<Class>', got {target!r}", where=where, field="head")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        raise UserError(f"no head class {target!r}", where=where, field="head.target") from None
    return cls(**spec.get("kwargs", {}))


def export_faded(faded: FadedModel, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` then `config.json` (backbone spec + head spec + `extra_config`).

    Each file is written atomically and the config last, so a folder with a config.json always
    holds the matching weights. Returns `out_dir`.
    """
    from safetensors.torch import save_model

    if not isinstance(faded, FadedModel):
        raise TypeError(f"export_faded needs a FadedModel (DualPath.fade()), got {type(faded).__name__}")
    if not is_plain(faded):
        raise TypeError("export_faded needs the bare backbone architecture: merge the tuner layers first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": faded.backbone.spec(),
        "head": head_spec(faded.head),
        "extra": extra_config or {},
    }
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(out / WEIGHTS, lambda tmp: save_model(faded, tmp, metadata={"format": FORMAT}), tensor_bytes(faded))
    _atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return out


def export_task(model: Any, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
    """Export a deployed task model (a class registered in `mdpd_vl.deploy.DEPLOYED`).

    The model writes its parts (`model.export_parts(folder) -> {"parts", "preprocess", ...}`), then
    `config.json` is written last and atomically: a folder with a config.json is complete."""
    from mdpd_vl.deploy import DEPLOYED

    task = getattr(model, "task", None)
    if task not in DEPLOYED:
        raise TypeError(f"{type(model).__name__} is not a registered deployed task model (mdpd_vl.deploy)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"format": TASK_FORMAT, "version": VERSION, "task": task, **model.export_parts(out),
              "extra": extra_config or {}}
    text = json.dumps(config, indent=2, sort_keys=True)
    _atomic_write(out / CONFIG, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return out


def load_config(out_dir: str | Path, formats: tuple[str, ...] = (FORMAT,)) -> dict[str, Any]:
    """Read and check an export's config.json (one of `formats`)."""
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise UserError("not found: not an exported model folder", where=str(path), field=CONFIG)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON ({err})", where=str(path), field=CONFIG) from None
    if not isinstance(config, dict) or config.get("format") not in formats:
        raise UserError(f"format is not {' or '.join(map(repr, formats))}", where=str(path), field="format")
    if config.get("version") != VERSION:
        raise UserError(f"unsupported version {config.get('version')!r}", where=str(path), field="version")
    keys = ("backbone", "head") if config["format"] == FORMAT else ("parts", "preprocess")
    for key in keys:
        if not isinstance(config.get(key), dict):
            raise UserError("missing or not a mapping", where=str(path), field=key)
    return config


def load_faded(out_dir: str | Path) -> FadedModel:
    """Rebuild one backbone + head from its config.json, load model.safetensors strictly; eval mode."""
    from safetensors.torch import load_model

    from mdpd_vl.backbones import build_backbone

    config = load_config(out_dir)
    weights = Path(out_dir) / WEIGHTS
    if not weights.is_file():
        raise UserError("not found", where=str(weights), field=WEIGHTS)
    where = str(Path(out_dir) / CONFIG)
    model = FadedModel(build_backbone(config["backbone"]), build_head(config["head"], where))
    load_model(model, str(weights), strict=True)
    return model.eval()


def load_exported(out_dir: str | Path) -> Any:
    """What an export folder holds, ready to use (eval mode): a task export gives the task's
    deployed model (ITR: `ImageTextRetriever`), a single part folder its `FadedModel`."""
    config = load_config(out_dir, (FORMAT, TASK_FORMAT))
    if config["format"] == FORMAT:
        return load_faded(out_dir)
    from mdpd_vl.deploy import DEPLOYED

    cls = DEPLOYED.get(str(config.get("task")), field="task")
    for name, part in config["parts"].items():
        if not isinstance(part, str) or Path(part).is_absolute() or ".." in Path(part).parts:
            raise UserError(f"part {name!r} must be a sub-folder name", where=str(Path(out_dir) / CONFIG), field="parts")
    return cls.from_export(Path(out_dir), config)
