"""Fading and export: the faded model equals the training-time backbone path, and the exported
checkpoint (safetensors + config.json) reloads into the same outputs with no side code involved."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import BUILDERS, make_input
from safetensors import safe_open

from mdpd_vl.distill import DistillConfig, DualPath
from mdpd_vl.errors import UserError
from mdpd_vl.export import CONFIG, WEIGHTS, export_faded, load_exported
from mdpd_vl.heads.pooling import GAPLinear
from mdpd_vl.side import build_side

CLASSES = 3


def trained_dualpath(family: str) -> tuple[DualPath, object]:
    torch.manual_seed(0)
    backbone = BUILDERS[family]()
    side = build_side("unipt", backbone.layer_specs, {"r": 2}, backbone=backbone)
    dp = DualPath(
        backbone, side, GAPLinear(side.out_width, CLASSES), GAPLinear(backbone.widths[-1], CLASSES),
        DistillConfig(d=4, backbone_trainable="norms_all"),
    )
    x = make_input(backbone)
    labels = torch.arange(4) % CLASSES
    opt = torch.optim.AdamW([p for g in dp.param_groups().values() for p in g], lr=0.05)
    dp.train()
    for _ in range(2):  # move the norms and W_B away from their initial values
        opt.zero_grad()
        dp(x, lambda y: F.cross_entropy(y, labels)).loss.backward()
        opt.step()
    return dp.eval(), x


@pytest.mark.parametrize("family", ["vit", "bert", "cnn"])
def test_export_reload_gives_the_same_outputs_and_holds_no_side_tensor(family: str, tmp_path) -> None:
    dp, x = trained_dualpath(family)
    faded = dp.fade().eval()
    with torch.no_grad():
        y_train_path = dp(x).y_backbone
        y_faded = faded(x)
    assert torch.allclose(y_faded, y_train_path, atol=1e-6)

    out = export_faded(faded, tmp_path / "faded", extra_config={"task": "unit-test"})
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]  # no temporary file left
    with safe_open(str(out / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(("backbone.", "head.")) for k in keys)
    banned = ("side", "phi", "generator", "mask_token", "ema")
    assert not [k for k in keys if any(b in k for b in banned)]
    config = json.loads((out / CONFIG).read_text())
    assert config["backbone"] == json.loads(json.dumps(dp.backbone.spec())) and config["extra"] == {"task": "unit-test"}

    loaded = load_exported(out)
    assert type(loaded.backbone) is type(dp.backbone)
    n_faded = sum(p.numel() for p in faded.parameters())
    assert sum(p.numel() for p in loaded.parameters()) == n_faded
    with torch.no_grad():
        assert torch.allclose(loaded(x), y_faded, atol=1e-5)


@pytest.mark.slow  # a fresh interpreter imports timm
def test_loading_needs_no_side_code(tmp_path) -> None:
    """A fresh interpreter loads the export and reproduces the outputs without importing any
    side, distillation or tuning module."""
    dp, x = trained_dualpath("cnn")
    export_faded(dp.fade(), tmp_path / "model")
    with torch.no_grad():
        torch.save({"x": x, "y": dp.fade()(x)}, tmp_path / "io.pt")
    script = (
        "import sys, torch\n"
        "from mdpd_vl.export import load_exported\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)\n"
        f"model = load_exported({str(tmp_path / 'model')!r})\n"
        "with torch.no_grad():\n"
        "    assert torch.allclose(model(io['x']), io['y'], atol=1e-5)\n"
        "print(sorted(m for m in sys.modules if m.startswith('mdpd_vl')))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = run.stdout.strip().splitlines()[-1]
    for banned in ("mdpd_vl.side", "mdpd_vl.distill", "mdpd_vl.tuning"):
        assert banned not in loaded, loaded


def test_bad_export_folders_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="config.json"):
        load_exported(tmp_path)
    (tmp_path / CONFIG).write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(UserError, match="format"):
        load_exported(tmp_path)
    (tmp_path / CONFIG).write_text(
        json.dumps({"format": "mdpd_vl.faded", "version": 1, "backbone": {"kind": "timm"},
                    "head": {"target": "os:system", "kwargs": {}}})
    )
    with pytest.raises(UserError, match="model.safetensors"):
        load_exported(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"")
    with pytest.raises(UserError, match="head"):  # never imports outside mdpd_vl
        from mdpd_vl.export import build_head

        build_head({"target": "os:system"})
