"""Export a faded model (backbone + W_B) as `model.safetensors` + `config.json`, and load it back.

`FadedModel` (what `DualPath.fade()` returns) lives here, in a module that imports no side,
distillation or tuning code. The checkpoint holds only backbone and head tensors: no side
network, bottleneck, generation block or mask token exists in a `FadedModel`, so none can be
saved. `load_exported` rebuilds the backbone from its `spec()` through
`mdpd_vl.backbones.build_backbone` (random init, no download) and the head from its head spec,
then loads the weights strictly; no side or distillation module is imported.

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


def load_config(out_dir: str | Path) -> dict[str, Any]:
    """Read and check an export's config.json."""
    path = Path(out_dir) / CONFIG
    if not path.is_file():
        raise UserError("not found: not an exported model folder", where=str(path), field=CONFIG)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON ({err})", where=str(path), field=CONFIG) from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"format is not {FORMAT!r}", where=str(path), field="format")
    if config.get("version") != VERSION:
        raise UserError(f"unsupported version {config.get('version')!r}", where=str(path), field="version")
    for key in ("backbone", "head"):
        if not isinstance(config.get(key), dict):
            raise UserError("missing or not a mapping", where=str(path), field=key)
    return config


def load_exported(out_dir: str | Path) -> FadedModel:
    """Rebuild backbone + head from config.json, load model.safetensors strictly; eval mode."""
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
