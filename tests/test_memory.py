"""Memory measurement: the exact peak of live tensor bytes over a training step (hand counts), exact
saved-for-backward, gradient and AdamW-state bytes; RSS and peak phases."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mdpd_vl.engine.memory import (
    GIB,
    LiveTensorBytes,
    PeakMemory,
    SavedTensorsMeter,
    gib,
    grad_bytes,
    measure_train_state,
    optimizer_state_bytes,
    param_bytes,
    train_peak_bytes,
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


# ----------------------------------------------------------------------------- the peak, by hand


def _numel_bytes(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) * F32


def _sgd_step(model: nn.Module, x: torch.Tensor) -> tuple[int, str]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # in place, no state: nothing hidden in the optimiser

    def step() -> None:
        model(x).sum().backward()
        opt.step()

    return train_peak_bytes(model, step, opt, x, device="cpu")


def test_peak_of_a_one_layer_mlp_is_the_hand_count():
    """y = W2 relu(W1 x + b1) + b2, loss = sum(y), SGD, few samples: the peak is at the very end of
    backward: parameters P and input x (alive throughout), the loss scalar and its seed ones, every
    gradient (P again) while the gradient of the hidden pre-activation (B x H) is still alive."""
    torch.manual_seed(0)
    b, d, h = 4, 8, 16
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 1))
    x = torch.randn(b, d)
    params = _numel_bytes(model)
    assert _sgd_step(model, x) == (2 * params + b * d * F32 + b * h * F32 + 2 * F32, "live_tensor_bytes")


def _blocks(checkpointed: bool, width: int) -> nn.Module:
    class TwoBlocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width)) for _ in range(2)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            return x

    torch.manual_seed(0)
    return TwoBlocks()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_peak_of_a_checkpointed_mlp_is_the_hand_count(checkpointed: bool):
    """Two MLP blocks (H -> 4H -> relu -> H), many samples, so activations dominate; a = B x H floats.
    Without checkpointing the peak is ReLU_2's backward: r1 (4a) and y1 (a) saved from block 1, r2
    (4a) saved from block 2, grad r2 (4a) and grad h2 (4a): 17a. With each block checkpointed, block
    1 keeps only its output y1 (a, block 2's input); block 2 is recomputed (r2', 4a) when backward
    reaches it: y1 + r2' + grad r2 + grad h2 = 13a. Both add P, x, the loss and its seed, and the
    gradients of block 2's last Linear (4H x H + H), already written."""
    b, width = 64, 4
    model = _blocks(checkpointed, width)
    x = torch.randn(b, width)
    a = b * width * F32
    fixed = _numel_bytes(model) + b * width * F32 + 2 * F32 + (4 * width * width + width) * F32
    peak, _ = _sgd_step(model, x)
    assert peak == fixed + (13 if checkpointed else 17) * a


def test_buffers_grads_and_optimiser_state_count_in_the_peak():
    torch.manual_seed(0)
    model, x, y = mlp_and_batch(batch=2)
    plain = measure_train_state(model, lambda: nn.functional.mse_loss(model(x), y), list(model.parameters()),
                                torch.optim.AdamW(model.parameters()), inputs=(x, y))
    model.register_buffer("ema", torch.zeros(1000))  # e.g. an EMA teacher's tensors: alive all step
    with_buffer = measure_train_state(model, lambda: nn.functional.mse_loss(model(x), y),
                                      list(model.parameters()), torch.optim.AdamW(model.parameters()), inputs=(x, y))
    assert with_buffer["train_peak_bytes"] - plain["train_peak_bytes"] == 1000 * F32
    assert plain["peak_kind"] == "live_tensor_bytes"
    # the first AdamW step allocates its state: peak >= parameters + gradients + 2 moments + inputs
    n = sum(p.numel() for p in model.parameters()) * F32
    assert plain["train_peak_bytes"] >= 4 * n + (x.numel() + y.numel()) * F32
    assert plain["train_peak_bytes"] > plain["train_state_bytes"]  # the breakdown leaves out the weights


def test_live_bytes_count_a_storage_once_and_forget_freed_ones():
    base = torch.zeros(100)
    with LiveTensorBytes([base]) as meter:
        view = base[10:20].view(2, 5)  # a view: no new storage
        base.add_(1)  # in place
        tmp = torch.ones(50)
        del tmp
        keep = torch.ones(25)
    assert meter.baseline_bytes == 100 * F32
    assert meter.peak_bytes == (100 + 50) * F32
    assert meter.sweep() == (100 + 25) * F32
    del view, keep


def test_gib_labels():
    assert gib(1.23 * GIB) == "1.23 GiB"
    assert gib(0) == "0.00 GiB"
    assert gib(512 * 1024**2, digits=1) == "0.5 GiB"


_RSS_PROBE = """
import torch
from mdpd_vl.engine.memory import PeakMemory, current_rss_bytes, peak_rss_bytes
assert peak_rss_bytes() >= current_rss_bytes() > 0
size = 64 * 1024**2
with PeakMemory("cpu") as phase:
    block = torch.ones(size // 4)  # touches every page
    del block
assert phase.kind == "cpu_rss" and phase.increase_bytes >= size * 0.9, phase.increase_bytes
assert phase.as_dict()["peak"].endswith(" GiB")
if phase.exact:  # the peak was reset at entry: an idle phase shows (almost) no growth
    with PeakMemory("cpu") as idle:
        pass
    assert idle.increase_bytes < size / 4, idle.increase_bytes
"""


def test_rss_and_cpu_peak_phase():
    # a fresh interpreter: inside the test session the allocator may hand back pages that are
    # already resident (freed by earlier tests), so a new block would not raise the RSS at all
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _RSS_PROBE], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_is_the_allocator_and_close_to_the_tensor_count():
    model = _blocks(True, 256).cuda()
    x = torch.randn(512, 256, device="cuda")
    peak, kind = _sgd_step(model, x)
    assert kind == "cuda_max_memory_allocated"
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with LiveTensorBytes([*model.parameters(), x]) as meter:
        model(x).sum().backward()
        opt.step()
    # the allocator rounds each block up to 512 bytes and may hold a cuBLAS workspace
    assert meter.peak_bytes <= peak <= meter.peak_bytes * 1.05 + 64 * 1024**2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_peak_phase():
    with PeakMemory("cuda") as phase:
        block = torch.empty(32 * 1024**2, dtype=torch.uint8, device="cuda")
        del block
    assert phase.kind == "cuda_allocated" and phase.peak_bytes - phase.baseline_bytes >= 32 * 1024**2
