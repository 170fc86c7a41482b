"""The distillation losses (paper eqs. 2-7), with ONE pinned reduction.

Reduction: every feature and logits loss is summed over tokens and channels (as eqs. 2, 4, 7
and 3 are written) and averaged over the batch. The paper's weights (1e-4 logits, 6e-5 deep,
4e-5 shallow, supplementary B) only balance against a task loss of order 1 when the
distillation terms are sum-reduced; a mean over N x D elements would make them vanish.
(MGD, whose masked generation MDPD follows, uses the same sum / batch with weight 2e-5.)
Teachers are always detached inside these functions, so a caller cannot forget it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mdpd_vl.dist import gather_batch


def _squared_error(teacher: Tensor, student: Tensor) -> Tensor:
    """(b - s)^2 elementwise, in float32 (a no-op cast in fp32; bf16 sums over N x D would lose digits).
    Autograd keeps only the difference for backward, not a copy of the teacher."""
    acc = _accumulation_dtype(teacher, student)
    return (teacher.detach().to(acc) - student.to(acc)).pow(2)


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input already is (tests check gradients in double)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def imitation_loss(teacher: Tensor, student: Tensor, valid: Tensor | None = None) -> Tensor:
    """L_sha = sum_{i,j} (b_ij - phi(s)_ij)^2 per sample, mean over the batch (eqs. 2 and 4).

    `valid` (`B x N` bool) drops padding tokens of text; the teacher b is detached.
    """
    diff = _squared_error(teacher, student)
    if valid is not None:
        diff = diff * valid.to(device=diff.device, dtype=diff.dtype).unsqueeze(-1)
    return diff.sum() / teacher.shape[0]


def masked_generation_loss(
    teacher: Tensor, generated: Tensor, mask: Tensor, valid: Tensor | None = None
) -> Tensor:
    """L_deep = sum_i m_i sum_j (b_ij - G(s_bar)_ij)^2 per sample, mean over the batch (eq. 7).

    Tokens with `mask` False (unmasked) or `valid` False (padding) contribute nothing.
    """
    m = mask.to(device=generated.device, dtype=torch.float32)
    if valid is not None:
        m = m * valid.to(device=generated.device, dtype=torch.float32)
    diff = _squared_error(teacher, generated) * m.unsqueeze(-1)
    return diff.sum() / teacher.shape[0]


def masked_rows_loss(teacher: Tensor, rows: Tensor, positions: Tensor) -> Tensor:
    """L_deep from G's outputs at the read tokens only: `rows` (`M x D`) are G(s_bar) at `positions`
    (`B x N` bool, masked and valid) in the order of `teacher[positions]`. Equals
    `masked_generation_loss` on the full output (the other tokens are multiplied by 0 there)."""
    picked = teacher.detach()[positions.to(teacher.device)]
    return _squared_error(picked, rows).sum() / teacher.shape[0]


def logits_mse(teacher: Tensor, student: Tensor) -> Tensor:
    """L_log = sum_i (y_S,i - y_B,i)^2 per sample, mean over the batch (eq. 3); y_S detached."""
    if teacher.shape != student.shape:
        raise ValueError(
            f"logits distillation 'mse' needs equal output shapes: side head gives "
            f"{tuple(teacher.shape)}, backbone head {tuple(student.shape)} (use logits: relational)"
        )
    return (teacher.detach() - student).pow(2).sum() / teacher.shape[0]


def relational_kl(teacher: Tensor, student: Tensor, temperature: float) -> Tensor:
    """KL(softmax(z_S z_S^T / T) || softmax(z_B z_B^T / T)) row-wise, mean over rows.

    z are the L2-normalised outputs of one batch, so the loss matches how each sample relates
    to the others (a ranking signal) rather than the raw embedding; output widths may differ.
    The teacher (side) is detached. Summed over the in-batch entries of a row, mean over rows.
    Several processes: the rows are those of the global batch (`mdpd_vl.dist.gather_batch`).
    """
    teacher, student = gather_batch(teacher.detach(), student)
    zs = F.normalize(teacher.flatten(1), dim=-1)
    zb = F.normalize(student.flatten(1), dim=-1)
    log_p = F.log_softmax(zs @ zs.T / temperature, dim=-1)
    log_q = F.log_softmax(zb @ zb.T / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


class _LiftedSquaredError(torch.autograd.Function):
    """sum_r ||t_r - (x_r W^T + c)||^2 over rows, keeping nothing D wide for backward.

    `x` is `B x N x d` (every token) or `M x d` (the rows at `positions`, in `teacher[positions]`
    order); the D-wide lift and the difference are rebuilt in backward from x (d wide), the weight and
    the teacher (alive anyway: the side network read it). The lift runs in x's dtype (bf16 under
    autocast) in both passes, the difference and the sum in float32.
    """

    @staticmethod
    def forward(ctx: Any, teacher: Tensor, x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor | None) -> Tensor:
        ctx.save_for_backward(teacher, x, weight, bias, positions)
        return _lifted_residual(teacher, x, weight, bias, positions).pow(2).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, Tensor | None, Tensor | None, None]:
        teacher, x, weight, bias, positions = ctx.saved_tensors
        r = _lifted_residual(teacher, x, weight, bias, positions)
        g = (r * (-2.0 * grad)).to(x.dtype)  # d loss / d lift
        grad_x = (g @ weight.to(x.dtype)).to(x.dtype) if ctx.needs_input_grad[1] else None
        rows_g, rows_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = (rows_g.t() @ rows_x).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_b = rows_g.sum(0).to(bias.dtype) if ctx.needs_input_grad[3] else None
        return None, grad_x, grad_w, grad_b, None


def _lifted_residual(teacher: Tensor, x: Tensor, weight: Tensor, bias: Tensor, positions: Tensor | None) -> Tensor:
    t = teacher if positions is None else teacher[positions]
    with torch.autocast(x.device.type, enabled=False):
        lift = F.linear(x, weight.to(x.dtype), bias.to(x.dtype))
    acc = _accumulation_dtype(t, lift)
    return t.to(acc) - lift.to(acc)


def lifted_squared_error(teacher: Tensor, x: Tensor, lift: torch.nn.Linear, positions: Tensor | None = None) -> Tensor:
    """sum of (b - lift(x))^2 over the rows the loss reads, mean over the batch: `imitation_loss(b, lift(x))`
    when `positions` is None (x: `B x N x d`), `masked_rows_loss(b, lift(x), positions)` otherwise
    (x: `M x d`, the rows at `positions`), without keeping the D-wide lift for backward (exact)."""
    if positions is not None:
        positions = positions.to(teacher.device)
    total = _LiftedSquaredError.apply(teacher.detach(), x, lift.weight, lift.bias, positions)
    return total / teacher.shape[0]
