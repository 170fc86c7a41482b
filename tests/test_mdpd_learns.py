"""MDPD teaches the backbone through distillation alone: the faded model learns a task it never saw.

Synthetic 4-way classification on a tiny random-init open_clip ViT: the class is the quadrant of a
32x32 noise image that carries a colour patch, so solving it needs the patch positions. The task
loss reaches only the side path (task_on_backbone False); the backbone head W_B learns only from
the logits distillation (paper eq. 3). The faded model (backbone + W_B) must end far above chance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import build_tiny_vit

from mdpd_vl.heads.pooling import GAPLinear
from mdpd_vl.tuning import MethodConfig, apply_method

STEPS, BATCH, CLASSES = 300, 32, 4


def quadrant_images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` noisy 3x32x32 images; label k = the quadrant (row-major) holding a coloured patch."""
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 3, 32, 32, generator=gen)
    colour = torch.tensor([1.5, -1.0, 0.5]).view(3, 1, 1)
    for i, k in enumerate(labels.tolist()):
        r, c = divmod(k, 2)
        x[i, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] += colour
    return x, labels


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_faded_backbone_learns_from_the_side_network_only() -> None:
    torch.manual_seed(0)
    backbone = build_tiny_vit()
    cfg = MethodConfig(name="mdpd", distill={"d": 8, "backbone_trainable": "head", "logits": "mse"})
    tuned = apply_method(backbone, lambda w: GAPLinear(w, CLASSES), cfg)
    gen = torch.Generator().manual_seed(0)
    x_test, y_test = quadrant_images(256, gen)
    faded = tuned.deployed()
    start = accuracy(faded, x_test, y_test)

    # Adam normalises each group's gradient scale, so W_B's pace is set by its learning rate, not
    # by the 1e-4 loss weight; a linear decay keeps it from chasing the moving teacher at the end
    opt = torch.optim.AdamW(tuned.optimizer_groups({"backbone_head": 0.1}), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / STEPS)
    w_b = list(tuned.core.head_backbone.parameters())
    for step in range(STEPS):
        x, y = quadrant_images(BATCH, gen)
        tuned.train()
        _, losses = tuned.train_forward(x, lambda z, y=y: F.cross_entropy(z, y))
        assert "task_backbone" not in losses
        if step == 0:  # the task loss has no path into the backbone head
            grads = torch.autograd.grad(losses["task_side"], w_b, retain_graph=True, allow_unused=True)
            assert all(g is None for g in grads)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        sched.step()

    side_acc = accuracy(tuned.core.side_kept(), x_test, y_test)
    end = accuracy(faded, x_test, y_test)
    assert side_acc > 0.9, side_acc  # the teacher solved the task
    assert end >= 0.6 and end >= start + 0.3, (start, end)
