"""The training loop: learning, param groups, accumulation, schedules, exact resume, NaN, bad input, 2 ranks."""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mdpd_vl.engine.checkpoint import list_checkpoints
from mdpd_vl.engine.config import TrainConfig
from mdpd_vl.engine.train import (
    NonFiniteLossError,
    batch_facts,
    epoch_batches,
    lr_factor,
    lr_multiplier,
    steps_per_epoch,
    train,
)
from mdpd_vl.errors import UserError

WORKER = Path(__file__).with_name("_train_worker.py")
REPO = WORKER.parent.parent


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.spare = nn.Linear(4, 1)  # in a param group, never used by the loss: its grad stays None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def regression(n: int = 64) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 4, generator=gen)
    return torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]]))


def collate(items):
    x, y = zip(*items)
    return torch.stack(x), torch.stack(y)


def mse_step(model, batch, step):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    return {"loss": loss, "half": loss / 2}


def groups_of(model: MLP, head_lr: float | None = None) -> list[dict]:
    head = {"name": "head", "params": list(model.head.parameters())}
    if head_lr is not None:
        head["lr"] = head_lr
    return [
        {"name": "body", "params": list(model.body.parameters())},
        head,
        {"name": "spare", "params": list(model.spare.parameters()), "weight_decay": 0.5},
    ]


def make(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def cfg_of(**kw) -> TrainConfig:
    base = dict(batch_size=8, lr=5e-2, log_every=1, ckpt_every=0, max_grad_norm=None, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_multiplier_values():
    # warmup (s+1)/W, then cosine from 1 to 0 over the remaining T - W steps
    assert [lr_multiplier(s, total=10, warmup=2, schedule="cosine") for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(6, total=10, warmup=2, schedule="cosine") == pytest.approx(0.5)
    assert lr_multiplier(9, total=10, warmup=2, schedule="cosine") == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8))
    )
    assert lr_multiplier(6, total=10, warmup=2, schedule="linear") == pytest.approx(0.5)
    assert lr_multiplier(9, total=10, warmup=0, schedule="linear") == pytest.approx(0.1)
    assert lr_multiplier(9, total=10, warmup=2, schedule="constant") == 1.0


def test_loss_falls_groups_schedule_and_run_folder(tmp_path):
    model = make()
    spare_before = [p.detach().clone() for p in model.spare.parameters()]
    cfg = cfg_of(epochs=6, warmup_steps=3, schedule="cosine", eval_every=12, ckpt_every=16, weight_decay=0.01)
    evals = []

    def eval_fn(m, step):
        evals.append((step, m.training))
        return {"step_seen": step}

    res = train(
        model,
        mse_step,
        regression(),
        collate,
        groups_of(model, head_lr=2e-2),
        cfg,
        tmp_path,
        eval_fn=eval_fn,
        progress=False,
        config={"task": "unit", "train": {"lr": 2e-2}},
    )
    total = 6 * (64 // 8)
    assert res.step == total and res.epoch == 6 and len(res.losses) == total and res.resumed_from is None
    assert sum(res.losses[-5:]) < 0.1 * sum(res.losses[:5]), res.losses
    # a parameter whose grad stays None is skipped by AdamW: not even weight decay touches it
    assert all(torch.equal(a, b) for a, b in zip(spare_before, model.spare.parameters()))

    lines = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, total + 1))
    for m in lines:  # every group at its own peak lr times the shared warmup + cosine factor
        factor = lr_multiplier(m["step"] - 1, total=total, warmup=3, schedule="cosine")
        assert m["lr/body"] == pytest.approx(5e-2 * factor) and m["lr/head"] == pytest.approx(2e-2 * factor)
        assert m["half"] == pytest.approx(m["loss"] / 2) and m["samples_per_s"] > 0
    assert [s for s, _ in evals] == [12, 24, 36, total] and evals[0][1] is True
    assert [m["eval/step_seen"] for m in read_metrics(tmp_path) if "eval/step_seen" in m] == [
        12,
        24,
        36,
        total,
    ]

    facts = json.loads((tmp_path / "config.json").read_text())
    assert facts["seed"] == 0 and facts["config"]["task"] == "unit" and facts["train"]["ckpt_every"] == 16
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"step-{total:08d}"]  # keep_checkpoints=1
    assert res.checkpoint == list_checkpoints(tmp_path)[-1]


def test_grad_accumulation_equals_big_batch(tmp_path):
    """batch 4 x 2 micro-batches gives the gradient of batch 8 (same samples, same order)."""
    seen: list[list[torch.Tensor]] = []

    def record(optimizer, args, kwargs):
        seen[-1].append(
            torch.cat(
                [
                    p.grad.reshape(-1)
                    for g in optimizer.param_groups
                    for p in g["params"]
                    if p.grad is not None
                ]
            )
        )

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(record)
    try:
        for i, (bs, accum) in enumerate([(8, 1), (4, 2)]):
            seen.append([])
            model = make()
            train(
                model,
                mse_step,
                regression(),
                collate,
                groups_of(model),
                cfg_of(batch_size=bs, grad_accum=accum, max_steps=3),
                tmp_path / str(i),
                progress=False,
            )
    finally:
        handle.remove()
    assert len(seen[0]) == len(seen[1]) == 3
    for big, accumulated in zip(*seen):
        torch.testing.assert_close(accumulated, big, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_on_cpu(tmp_path):
    dtypes = []

    def step(model, batch, step):
        out = model(batch[0])
        dtypes.append(out.dtype)
        return {"loss": nn.functional.mse_loss(out.float(), batch[1])}

    model = make()
    res = train(
        model,
        step,
        regression(),
        collate,
        groups_of(model),
        cfg_of(max_steps=2, mixed_precision="bf16"),
        tmp_path,
        progress=True,
    )
    assert res.step == 2 and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def nan_at_6(model, batch, step):
        out = mse_step(model, batch, step)
        return {"loss": out["loss"] * float("nan")} if step == 6 else out

    model = make()
    with pytest.raises(NonFiniteLossError) as info:
        train(
            model,
            nan_at_6,
            regression(),
            collate,
            groups_of(model),
            cfg_of(epochs=2, ckpt_every=4),
            tmp_path,
            progress=False,
        )
    message = str(info.value)
    assert "\n" not in message and "loss is nan at step 6" in message and "step-00000004" in message
    assert isinstance(info.value, UserError)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never updated weights
    # the kept checkpoint is usable: the same folder resumes from step 4
    model = make(seed=1)
    res = train(
        model,
        mse_step,
        regression(),
        collate,
        groups_of(model),
        cfg_of(epochs=2, ckpt_every=4),
        tmp_path,
        progress=False,
    )
    assert res.resumed_from == 4 and res.step == 16 and len(res.losses) == 12


def test_bad_input(tmp_path):
    model = make()
    cfg = cfg_of(max_steps=2)
    args = (mse_step, regression(), collate, groups_of(model), cfg)
    missing = tmp_path / "nowhere" / "step-00000009"
    with pytest.raises(UserError, match=f"^{missing}: checkpoint not found$"):
        train(model, *args, tmp_path / "a", resume=str(missing), progress=False)
    assert not (tmp_path / "a").exists()  # nothing created
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train(model, *args, tmp_path / "b", resume=True, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match=f"^{blocker / 'run'}: run folder is not usable"):
        train(model, *args, blocker / "run", progress=False)
    with pytest.raises(UserError, match=r"64 samples cannot fill one step of 80"):
        train(model, mse_step, regression(), collate, groups_of(model), cfg_of(batch_size=80), tmp_path / "c")

    train(model, *args, tmp_path / "d", progress=False)
    other = make()
    with pytest.raises(UserError, match=r"holds checkpoints of an earlier run \(newest: step-00000002\)"):
        train(other, mse_step, regression(), collate, groups_of(other), cfg, tmp_path / "d", resume=None)
    with pytest.raises(
        UserError, match=r"step-00000002: this run's settings differ from the checkpoint's: "
        r"train\.batch_size \(checkpoint 8, now 4\); resume with the checkpoint's values, or start afresh"
    ):
        train(
            other,
            mse_step,
            regression(),
            collate,
            groups_of(other),
            cfg_of(max_steps=2, batch_size=4),
            tmp_path / "d",
            progress=False,
        )
    two_groups = groups_of(other)[:2]
    with pytest.raises(
        UserError,
        match=r"step-00000002: .*groups \(checkpoint \['body', 'head', 'spare'\], now \['body', 'head'\]\)",
    ):
        train(other, mse_step, regression(), collate, two_groups, cfg, tmp_path / "d", progress=False)
    state = list_checkpoints(tmp_path / "d")[-1] / "state.pt"
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"^{state}: cannot read checkpoint"):
        train(other, mse_step, regression(), collate, groups_of(other), cfg, tmp_path / "d", progress=False)


def _env() -> dict[str, str]:
    # one thread everywhere: CPU kernels then reduce in the same order in every run
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _worker(run_dir: Path, out: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(WORKER),
        "--run-dir",
        str(run_dir),
        "--out",
        str(out),
        "--set",
        "grad_accum=2",
        *extra,
    ]
    return subprocess.Popen(cmd, env=_env(), text=True, **popen)


def _weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"weights-{rank}.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    # 96 samples / batch 8 / 2 micro-batches = 6 steps per epoch, 18 in all, checkpoints every 4:
    # killed at step 9, the run restarts from step 8 = epoch 1, 2 windows in (mid-epoch, with RNG draws)
    whole = _worker(tmp_path / "whole", tmp_path / "out_whole", stdout=subprocess.DEVNULL)
    victim = _worker(tmp_path / "cut", tmp_path / "out_cut", "--hang-at", "9", stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([victim.stdout], [], [], 180)  # never block the suite forever
        line = victim.stdout.readline() if ready else "(no output within 180 s)"
        assert line.strip() == "HANG 9", line
        assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-00000008"]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        assert whole.wait(timeout=180) == 0
    finally:
        for proc in (victim, whole):
            if proc.poll() is None:
                proc.kill()
    resumed = _worker(tmp_path / "cut", tmp_path / "out_cut")
    assert resumed.wait(timeout=180) == 0

    result = json.loads((tmp_path / "out_cut" / "result-0.json").read_text())
    assert result["resumed_from"] == 8 and result["step"] == 18 and len(result["losses"]) == 10
    a, b = _weights(tmp_path / "out_whole"), _weights(tmp_path / "out_cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # the metrics lines of the lost steps 9.. were dropped and re-logged: the logs match too
    def without_speed(lines: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k != "samples_per_s"} for m in lines]

    assert without_speed(read_metrics(tmp_path / "cut")) == without_speed(read_metrics(tmp_path / "whole"))


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        "--run-dir",
        str(tmp_path / "run"),
        "--out",
        str(tmp_path / "out"),
        "--set",
        "lr_scaling=linear",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = _weights(tmp_path / "out", 0), _weights(tmp_path / "out", 1)
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    r0, r1 = (json.loads((tmp_path / "out" / f"result-{r}.json").read_text()) for r in (0, 1))
    # 96 samples over 2 ranks x batch 8 = 6 steps per epoch, 3 epochs; losses are averaged over ranks
    assert r0["step"] == 18 and r0["losses"] == r1["losses"]
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "rng-0.pt", "rng-1.pt", "state.pt"]
    facts = json.loads((tmp_path / "run" / "config.json").read_text())
    assert facts["world_size"] == 2
    assert facts["batch"] == {"processes": 2, "batch_size": 8, "grad_accum": 1, "per_process_batch": 8,
                              "global_batch": 16, "lr_scaling": "linear", "lr_factor": 2.0}
    # linear scaling: every group's peak lr x 2 (warm-up 2 steps: step 1 runs at the peak)
    line = read_metrics(tmp_path / "run")[1]
    assert line["lr/body"] == pytest.approx(2e-2) and line["lr/head"] == pytest.approx(1e-2)
    assert time.time() - t0 < 300


class NoisyItems(torch.utils.data.Dataset):
    """Each item draws fresh noise from the global RNG, like a random augmentation."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i)) + torch.rand(4), torch.zeros(1)


def test_worker_processes_see_the_same_samples_whatever_their_number(tmp_path):
    """Items are loaded under a seed of (seed, epoch, index): batches do not depend on num_workers."""
    seen: dict[int, list[torch.Tensor]] = {}
    for workers in (1, 2):
        model, inputs = make(), []

        def step(m, batch, step, inputs=inputs):
            inputs.append(batch[0].clone())
            return mse_step(m, batch, step)

        cfg = cfg_of(max_steps=6, num_workers=workers)
        train(
            model, step, NoisyItems(), collate, groups_of(model), cfg, tmp_path / str(workers), progress=False
        )
        seen[workers] = inputs
    assert len(seen[1]) == 6
    for a, b in zip(seen[1], seen[2]):
        assert torch.equal(a, b)


def test_rank_slices_of_global_batches_are_the_one_process_batches() -> None:
    one = epoch_batches(50, epoch=3, seed=1, batch_size=8)
    two = [epoch_batches(50, epoch=3, seed=1, batch_size=4, rank=r, world=2) for r in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 6  # 50 // 8: full global batches only
    for b, (r0, r1) in zip(one, zip(*two)):
        assert r0 + r1 == b  # gathered in rank order = the one-process batch, in order
    assert epoch_batches(50, epoch=4, seed=1, batch_size=8) != one  # reshuffled per epoch


def test_batch_facts_and_the_lr_rule() -> None:
    cfg = TrainConfig(batch_size=6, grad_accum=2)
    assert batch_facts(cfg, 4) == {"processes": 4, "batch_size": 6, "grad_accum": 2, "per_process_batch": 12,
                                   "global_batch": 48, "lr_scaling": "none", "lr_factor": 1.0}
    assert lr_factor(TrainConfig(lr_scaling="linear"), 4) == 4.0 and lr_factor(cfg, 4) == 1.0
    assert steps_per_epoch(100, cfg, 1) == 8 and steps_per_epoch(100, cfg, 4) == 2
    assert steps_per_epoch(40, cfg, 4) == 0  # one step needs 48 samples
    with pytest.raises(UserError, match="lr_scaling"):
        from mdpd_vl.engine.config import load_config

        load_config(TrainConfig, None, ["lr_scaling=quadratic"])


class EpochItems(torch.utils.data.Dataset):
    """Items that depend on the epoch set by the engine (like IndexDataset's caption draw)."""

    def __init__(self) -> None:
        self.epoch, self.calls = 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.calls.append(epoch)

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((4,), float(i) + 100.0 * self.epoch), torch.zeros(1)


def test_the_engine_sets_the_epoch_and_a_resume_restores_it(tmp_path: Path) -> None:
    seen: dict[str, list[float]] = {}
    for name, plan in (("whole", [6]), ("cut", [3, 6])):
        data = torch.utils.data.Subset(EpochItems(), range(16))  # set_epoch reached through a wrapper
        seen[name] = []
        for max_steps in plan:  # 16 items / batch 8 = 2 steps per epoch: steps 0-5 = epochs 0, 0, 1, 1, 2, 2
            model = make()

            def step(m, batch, step, out=seen[name]):
                out.append(float(batch[0][:, 0].max()) // 100)
                return mse_step(m, batch, step)

            train(model, step, data, collate, groups_of(model), cfg_of(max_steps=max_steps, ckpt_every=1),
                  tmp_path / name, progress=False)
        assert data.dataset.calls[0] == 0 and data.dataset.calls[-1] == 2
    assert seen["whole"] == [0, 0, 1, 1, 2, 2]
    assert seen["cut"] == seen["whole"]  # resumed at step 3 (epoch 1, mid-epoch): epoch 1 again
