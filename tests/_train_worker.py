"""A tiny regression run of the engine's training loop, used in-process and as a subprocess.

As a script (alone, or under `torchrun --nproc_per_node 2`), it trains and writes the final model
state of each rank to `<out>/weights-<rank>.safetensors` plus `<out>/result-<rank>.json`.
`--hang-at STEP` makes step_fn print `HANG` and sleep at that step, so a test can SIGKILL it there.
The step function draws from python's, numpy's and torch's RNGs (loss weight, dropout), and the
model has BatchNorm buffers and a frozen parameter, so an exact resume must restore all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


class TinyRegressor(nn.Module):
    """x -> Linear -> BatchNorm -> ReLU -> Dropout -> Linear, plus a frozen input scale."""

    def __init__(self, d_in: int = 6, hidden: int = 16, d_out: int = 2):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d_in), requires_grad=False)
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1))
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x * self.scale))


def make_data(n: int = 96, d_in: int = 6, d_out: int = 2, seed: int = 123) -> torch.utils.data.TensorDataset:
    """A seeded linear regression problem with a little noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    w = torch.randn(d_in, d_out, generator=gen)
    y = x @ w + 0.01 * torch.randn(n, d_out, generator=gen)
    return torch.utils.data.TensorDataset(x, y)


def collate(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    x, y = zip(*items)
    return {"x": torch.stack(x), "y": torch.stack(y)}


def step_fn(model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """MSE scaled by a random factor drawn from python's and numpy's RNGs (so both matter)."""
    mse = nn.functional.mse_loss(model(batch["x"]), batch["y"])
    factor = 1.0 + 0.05 * random.random() + 0.05 * abs(float(np.random.randn()))
    return {"loss": mse * factor, "mse": mse}


def build(seed: int = 0) -> tuple[TinyRegressor, list[dict[str, Any]]]:
    """The seeded model and its two param groups (the head at half the base lr)."""
    torch.manual_seed(seed)
    model = TinyRegressor()
    groups = [
        {"name": "body", "params": list(model.body.parameters())},
        {"name": "head", "params": list(model.head.parameters()), "lr": 5e-3},
    ]
    return model, groups


def main() -> None:
    from safetensors.torch import save_file

    from mdpd_vl.engine.config import load_config
    from mdpd_vl.engine.train import TrainConfig, train

    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hang-at", type=int, default=-1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    cfg = load_config(
        TrainConfig,
        None,
        [
            "lr=1e-2",
            "batch_size=8",
            "epochs=3",
            "warmup_steps=2",
            "log_every=1",
            "ckpt_every=4",
            *args.overrides,
        ],
    )
    model, groups = build(cfg.seed)

    def maybe_hang(m: nn.Module, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        if step == args.hang_at:
            print(f"HANG {step}", flush=True)
            time.sleep(600)
        return step_fn(m, batch, step)

    result = train(
        model,
        maybe_hang,
        make_data(),
        collate,
        groups,
        cfg,
        args.run_dir,
        progress=False,
        config={"worker": True},
    )
    rank = int(os.environ.get("RANK", "0"))
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"weights-{rank}.safetensors"))
    info = {"step": result.step, "losses": result.losses, "resumed_from": result.resumed_from}
    (args.out / f"result-{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    sys.exit(main())
