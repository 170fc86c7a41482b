"""Faults of the training engine: non-finite numbers (config, loss, weights), a resume whose settings
differ from its checkpoint, a full disk while checkpointing or logging, a kill inside a checkpoint
write, a damaged checkpoint."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import typing
from pathlib import Path

import pytest
import torch
from faults_helpers import ROOT, killed, run_faulty, temp_files
from torch import nn

from mdpd_vl.engine import checkpoint as ckpt
from mdpd_vl.engine.checkpoint import list_checkpoints
from mdpd_vl.engine.config import TrainConfig, load_config
from mdpd_vl.engine.train import NonFiniteLossError, train
from mdpd_vl.errors import UserError

WORKER = str(ROOT / "tests" / "_train_worker.py")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def data(n: int = 32) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=gen)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def collate(items):
    x, y = zip(*items)
    return torch.stack(x), torch.stack(y)


def mse(model, batch, step):
    x, y = batch
    return {"loss": nn.functional.mse_loss(model(x), y)}


def groups(model: MLP, head_lr: float | None = None) -> list[dict]:
    head = {"name": "head", "params": list(model.head.parameters()), **({"lr": head_lr} if head_lr else {})}
    return [{"name": "body", "params": list(model.body.parameters())}, head]


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "lr": 1e-2, "log_every": 1, "ckpt_every": 2, "epochs": 1, **kw})


def fit(run_dir: Path, c: TrainConfig, *, seed: int = 0, head_lr: float | None = None, config=None, **kw):
    torch.manual_seed(seed)
    model = MLP()
    res = train(model, kw.pop("step_fn", mse), data(), collate, groups(model, head_lr), c, run_dir,
                progress=False, config=config, **kw)
    return model, res


def float_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every float field (also `float | None` and tuples of floats) of a config tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += float_fields(tp, f"{prefix}{f.name}.")
        elif float in (typing.get_args(tp) or (tp,)) or "float" in str(tp):
            out.append(f"{prefix}{f.name}")
    return out


# ----------------------------------------------------------------------------- non-finite numbers


NON_FINITE = [".inf", "-.inf", ".nan", ".NaN"]


@pytest.mark.parametrize(("key", "value"), [
    (k, f"[{v}, 0.999]" if k == "betas" else v) for k in float_fields(TrainConfig) for v in NON_FINITE])
def test_non_finite_config_numbers_are_one_line(key: str, value: str) -> None:
    with pytest.raises(UserError) as info:
        load_config(TrainConfig, None, [f"{key}={value}"])
    assert str(info.value).startswith(f"--set {key}={value}: {key}") and "finite" in str(info.value)


@pytest.mark.parametrize("key", ["lr", "eps", "weight_decay", "warmup_ratio", "max_grad_norm"])
def test_non_finite_numbers_refused_in_python_too(key: str) -> None:
    with pytest.raises(UserError, match=f"^{key}: must be a finite number"):
        TrainConfig(**{key: float("inf")})


def test_huge_lr_never_saves_non_finite_weights_nor_calls_them_good(tmp_path: Path) -> None:
    # The run: lr inf. The config refuses it now (above); set past the validation here, it
    # shows the engine's own guard: step 1's loss is finite, its update leaves non-finite weights, and
    # the old engine saved that model at step 1 and called it "last good checkpoint".
    bad = cfg(ckpt_every=1, max_grad_norm=None)
    bad.lr = float("inf")
    with pytest.raises(ckpt.NonFiniteError) as info:
        fit(tmp_path, bad)
    message = str(info.value)
    assert "\n" not in message and "weights are not finite after step 1" in message
    assert "not saved; last good checkpoint: none" in message
    assert list_checkpoints(tmp_path) == [] and temp_files(tmp_path) == []
    # the folder holds no bad checkpoint to auto-resume from: a sane rerun starts afresh and succeeds
    model, res = fit(tmp_path, cfg())
    assert res.resumed_from is None and all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_weights_after_a_good_checkpoint_name_it(tmp_path: Path) -> None:
    def poison_at_3(model, batch, step):
        out = mse(model, batch, step)
        if step == 3:  # a finite loss, but the update of this step leaves inf in the weights
            out["loss"] = out["loss"] + 0 * model.head.weight.sum()
            with torch.no_grad():
                model.body[0].bias.fill_(float("inf"))
        return out

    with pytest.raises(ckpt.NonFiniteError) as info:
        fit(tmp_path, cfg(max_grad_norm=None), step_fn=poison_at_3)
    assert "last good checkpoint: " in str(info.value) and str(info.value).count("step-00000002") == 1
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    good = ckpt.non_finite(__import__("safetensors.torch", fromlist=["x"]).load_file(
        str(list_checkpoints(tmp_path)[0] / "model.safetensors")))
    assert good[0] == 0


def test_nan_loss_message_names_a_finite_checkpoint(tmp_path: Path) -> None:
    def nan_at_3(model, batch, step):
        out = mse(model, batch, step)
        return {"loss": out["loss"] * float("nan")} if step == 3 else out

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .* last good checkpoint: .*step-00000002"):
        fit(tmp_path, cfg(), step_fn=nan_at_3)


def test_a_non_finite_checkpoint_of_an_older_run_is_not_resumed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    fit(tmp_path, cfg(max_steps=2))
    weights = list_checkpoints(tmp_path)[-1] / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["head.bias"].fill_(float("nan"))
    save_file(tensors, str(weights))
    with pytest.raises(UserError) as info:
        fit(tmp_path, cfg(max_steps=4))
    assert str(info.value).startswith(f"{weights}: holds 1 non-finite weights") and "cannot be resumed" in str(
        info.value)


# ----------------------------------------------------------------------------- resume settings


@pytest.mark.parametrize("change", [
    {"lr": 5e-2}, {"schedule": "linear"}, {"warmup_steps": 1}, {"warmup_ratio": 0.1}, {"batch_size": 4},
    {"grad_accum": 2}, {"seed": 1}, {"weight_decay": 0.5}, {"betas": (0.8, 0.9)}, {"eps": 1e-6},
    {"max_grad_norm": None}, {"mixed_precision": "no"},
])
def test_resume_refuses_settings_the_checkpoint_decided(tmp_path: Path, change: dict) -> None:
    fit(tmp_path, cfg(max_steps=2))
    with pytest.raises(UserError) as info:
        fit(tmp_path, cfg(max_steps=4, **change))
    message = str(info.value)
    key = next(iter(change))
    assert message.startswith(f"{list_checkpoints(tmp_path)[-1]}: this run's settings differ from the checkpoint's: ")
    assert f"train.{key} (checkpoint " in message and "start afresh in another run folder" in message
    assert "\n" not in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]  # nothing was trained


def test_every_differing_key_is_named_in_one_line(tmp_path: Path) -> None:
    fit(tmp_path, cfg(max_steps=2), config={"method": {"name": "mdpd", "r": 2}, "output_dir": "a"})
    with pytest.raises(UserError) as info:
        fit(tmp_path, cfg(max_steps=4, lr=1e-1, seed=3), head_lr=1e-3,
            config={"method": {"name": "lora", "r": 2}, "output_dir": "b"})
    message = str(info.value)
    for part in ("method.name (checkpoint 'mdpd', now 'lora')", "train.lr (checkpoint 0.01, now 0.1)",
                 "train.seed (checkpoint 0, now 3)", "groups[head].lr (checkpoint 0.01, now 0.001)"):
        assert part in message
    assert "output_dir" not in message and "\n" not in message  # where the run lives may change


def test_free_settings_are_applied_and_recorded(tmp_path: Path) -> None:
    fit(tmp_path, cfg(max_steps=2), config={"output_dir": "a", "data": {"root": "x", "eval_split": "test"}})
    _, res = fit(tmp_path, cfg(max_steps=None, epochs=2, log_every=2, ckpt_every=3, keep_checkpoints=2),
                 config={"output_dir": "b", "data": {"root": "y", "eval_split": "val"}})
    assert res.resumed_from == 2 and res.step == 8  # two epochs of 4 steps: the run was extended
    record = json.loads((tmp_path / "config.json").read_text())
    changed = record["resumed_from"]["changed"]
    assert record["resumed_from"]["step"] == 2 and record["train"]["epochs"] == 2
    assert set(changed) == {"train.epochs", "train.max_steps", "train.log_every", "train.ckpt_every",
                            "train.keep_checkpoints", "output_dir", "data.root", "data.eval_split"}
    assert changed["data.eval_split"] == {"checkpoint": "test", "now": "val"}


def test_recipe_may_free_more_keys(tmp_path: Path) -> None:
    fit(tmp_path, cfg(max_steps=2), config={"report": {"style": "a"}})
    with pytest.raises(UserError, match=r"report\.style"):
        fit(tmp_path, cfg(max_steps=3), config={"report": {"style": "b"}})
    _, res = fit(tmp_path, cfg(max_steps=3), config={"report": {"style": "b"}}, resume_free=["report.*"])
    assert res.resumed_from == 2 and res.step == 3


# ----------------------------------------------------------------------------- full disk, kills, damage


@pytest.mark.parametrize("part", ["model.safetensors", "state.pt", "rng-0.pt"])
def test_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp(tmp_path: Path, monkeypatch, part) -> None:
    fit(tmp_path, cfg(max_steps=2))
    before = (list_checkpoints(tmp_path)[-1] / "model.safetensors").read_bytes()
    real = ckpt._write_file

    def full(path: Path, blob: bytes) -> None:
        if path.name == part:
            path.write_bytes(blob[: len(blob) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, blob)

    monkeypatch.setattr(ckpt, "_write_file", full)
    with pytest.raises(UserError) as info:
        fit(tmp_path, cfg(max_steps=4))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'checkpoints' / 'step-00000004'}: cannot write (No space left on device)")
    assert "it needs" in message and "bytes free there" in message and "\n" not in message
    assert temp_files(tmp_path) == []  # the half-written temp folder is gone
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    assert (list_checkpoints(tmp_path)[-1] / "model.safetensors").read_bytes() == before
    monkeypatch.setattr(ckpt, "_write_file", real)  # space again: the same command resumes and finishes
    _, res = fit(tmp_path, cfg(max_steps=4))
    assert res.resumed_from == 2 and res.step == 4


def test_full_disk_on_the_metrics_log_is_one_line_and_keeps_it_valid(tmp_path: Path, monkeypatch) -> None:
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def tell(self):
            return self.fh.tell()

        def truncate(self, n):
            return self.fh.truncate(n)

        def write(self, data):
            self.fh.write(data[:7])
            self.fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.fh.flush()

    def fake_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        return Full(fh) if str(file).endswith("metrics.jsonl") and "a" in mode and "step-" not in str(file) \
            and os.environ.get("FULL_METRICS") else fh

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setenv("FULL_METRICS", "1")
    with pytest.raises(UserError, match=r"metrics\.jsonl: cannot write \(No space left on device\); it needs \d+"):
        fit(tmp_path, cfg(max_steps=2))
    monkeypatch.delenv("FULL_METRICS")
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # the cut line was taken back


@pytest.mark.parametrize("part", ["model.safetensors", "state.pt", "rng-0.pt"])
def test_kill_inside_a_checkpoint_write_then_resume(tmp_path: Path, part: str) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    # _train_worker: 96 samples / batch 8 = 12 steps an epoch, checkpoints every 4; the kill lands in the
    # first checkpoint's write of `part` (step 4), which must leave no trace but a temp folder
    args = ["--run-dir", str(run), "--out", str(out), "--set", "epochs=1", "--set", "ckpt_every=4"]
    done = run_faulty(["--script", WORKER], args, kill_fsync=f"*/.tmp-step-00000004/{part}", timeout=240)
    assert killed(done), done.stderr[-2000:]
    assert list_checkpoints(run) == [] and len(temp_files(run)) == 1
    again = run_faulty(["--script", WORKER], args, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((out / "result-0.json").read_text())
    assert result["resumed_from"] is None and result["step"] == 12  # nothing half-written was taken
    assert temp_files(run) == [] and [p.name for p in list_checkpoints(run)] == ["step-00000012"]


def test_kill_between_checkpoints_resumes_from_the_complete_one(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    args = ["--run-dir", str(run), "--out", str(out), "--set", "epochs=1", "--set", "ckpt_every=4",
            "--set", "keep_checkpoints=3"]
    done = run_faulty(["--script", WORKER], args, kill_fsync="*/.tmp-step-00000008/state.pt", timeout=240)
    assert killed(done)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"] and len(temp_files(run)) == 1
    again = run_faulty(["--script", WORKER], args, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "result-0.json").read_text())["resumed_from"] == 4
    assert temp_files(run) == []


def test_a_real_file_size_limit_while_checkpointing(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    args = ["--run-dir", str(run), "--out", str(out), "--set", "epochs=1", "--set", "ckpt_every=4"]
    done = run_faulty(["--script", WORKER], args, fsize=2048, timeout=240, user_errors=True)  # state.pt is larger
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    line = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "step-00000004: cannot write (File too large); it needs" in line[0]
    assert list_checkpoints(run) == [] and temp_files(run) == []


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "missing"])
@pytest.mark.parametrize("part", ["model.safetensors", "state.pt", "rng-0.pt"])
def test_damaged_checkpoint_file_is_one_line(tmp_path: Path, damage: str, part: str) -> None:
    fit(tmp_path, cfg(max_steps=2))
    path = list_checkpoints(tmp_path)[-1] / part
    blob = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes({"empty": b"", "truncated": blob[: len(blob) // 2], "garbage": b"\x80\x04junk" * 9}[damage])
    with pytest.raises(UserError) as info:
        fit(tmp_path, cfg(max_steps=4))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
