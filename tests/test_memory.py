"""Memory measurement: exact saved-for-backward, gradient and AdamW-state bytes; RSS and peak phases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mdpd_vl.engine.memory import (
    GIB,
    PeakMemory,
    SavedTensorsMeter,
    current_rss_bytes,
    gib,
    grad_bytes,
    measure_train_state,
    optimizer_state_bytes,
    param_bytes,
    peak_rss_bytes,
)

F32 = 4  # bytes per float32 element


def mlp_and_batch(batch: int = 3) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.randn(batch, 4), torch.randn(batch, 2)


def test_saved_bytes_of_an_mlp_are_exact():
    model, x, y = mlp_and_batch()
    b, d_in, hidden, d_out = x.shape[0], model[0].in_features, model[0].out_features, model[2].out_features
    with SavedTensorsMeter(exclude=model.parameters()) as meter:
        loss = nn.functional.mse_loss(model(x), y)
    # linear 1 keeps x (its weight's grad needs it); relu keeps its output, which linear 2 keeps
    # as its input too (one storage); linear 2 also keeps W2^T (a parameter: excluded);
    # mse keeps the prediction and the target
    expected = (b * d_in + b * hidden + b * d_out + b * d_out) * F32
    assert meter.bytes == expected == 192 and meter.count == 4
    loss.backward()

    with SavedTensorsMeter() as everything:  # without the exclusion W2's storage counts as well
        nn.functional.mse_loss(model(x), y)
    assert everything.bytes == expected + hidden * d_out * F32


def test_frozen_first_layer_saves_less():
    model, x, y = mlp_and_batch()
    model[0].requires_grad_(False)
    b, hidden, d_out = x.shape[0], model[0].out_features, model[2].out_features
    with SavedTensorsMeter(exclude=model.parameters()) as meter:
        nn.functional.mse_loss(model(x), y)
    # nothing before linear 2 needs a gradient: only linear 2's input and mse's two operands stay
    assert meter.bytes == (b * hidden + 2 * b * d_out) * F32


def test_a_storage_counts_once_and_whole():
    x = torch.randn(10, 6, requires_grad=True)
    with SavedTensorsMeter() as meter:
        (x * x).sum()  # mul saves both operands: the same storage
    assert meter.bytes == x.numel() * F32 and meter.count == 1
    base = torch.randn(100)
    with SavedTensorsMeter() as meter:
        # d/dx needs only the other operand, a 60-element view that keeps its whole base alive
        (x * base[:60].view(10, 6)).sum()
    assert meter.bytes == base.numel() * F32 and meter.count == 1


def test_param_grad_and_adamw_state_bytes():
    layer = nn.Linear(4, 3)
    n = sum(p.numel() for p in layer.parameters())
    assert param_bytes([*layer.parameters(), layer.weight]) == n * F32  # duplicates count once
    assert grad_bytes(layer.parameters()) == 0
    opt = torch.optim.AdamW(layer.parameters())
    assert optimizer_state_bytes(opt) == 0  # AdamW allocates its state at the first step
    layer(torch.randn(2, 4)).sum().backward()
    assert grad_bytes(layer.parameters()) == n * F32
    opt.step()
    # exp_avg + exp_avg_sq like each parameter, plus one float32 `step` scalar per parameter tensor
    assert optimizer_state_bytes(opt) == 2 * n * F32 + 2 * F32 == 128


def test_measure_train_state_on_head_only_training():
    model, x, y = mlp_and_batch()
    model[0].requires_grad_(False)
    head = list(model[2].parameters())
    opt = torch.optim.AdamW(head)
    before = [p.detach().clone() for p in head]
    out = measure_train_state(model, lambda: {"loss": nn.functional.mse_loss(model(x), y)}, head, opt)
    b, hidden, d_out = x.shape[0], model[0].out_features, model[2].out_features
    n_head = hidden * d_out + d_out
    assert out["saved_bytes"] == (b * hidden + 2 * b * d_out) * F32
    assert out["grad_bytes"] == n_head * F32
    assert out["optim_bytes"] == 2 * n_head * F32 + len(head) * F32
    assert out["train_state_bytes"] == out["saved_bytes"] + out["grad_bytes"] + out["optim_bytes"]
    assert out["param_bytes"] == sum(p.numel() for p in model.parameters()) * F32
    assert not any(torch.equal(a, p) for a, p in zip(before, head))  # a real step happened
    assert all(p.grad is None for p in head)


def test_gib_labels():
    assert gib(1.23 * GIB) == "1.23 GiB"
    assert gib(0) == "0.00 GiB"
    assert gib(512 * 1024**2, digits=1) == "0.5 GiB"


def test_rss_and_cpu_peak_phase():
    assert peak_rss_bytes() >= current_rss_bytes() > 0
    size = 64 * 1024**2
    with PeakMemory("cpu") as phase:
        block = torch.ones(size // F32)  # touches every page
        del block
    assert phase.kind == "cpu_rss" and phase.increase_bytes >= size * 0.9
    assert phase.as_dict()["peak"].endswith(" GiB")
    if phase.exact:  # the peak was reset at entry: an idle phase shows (almost) no growth
        with PeakMemory("cpu") as idle:
            pass
        assert idle.increase_bytes < size / 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_phase():
    with PeakMemory("cuda") as phase:
        block = torch.empty(32 * 1024**2, dtype=torch.uint8, device="cuda")
        del block
    assert phase.kind == "cuda_allocated" and phase.peak_bytes - phase.baseline_bytes >= 32 * 1024**2
