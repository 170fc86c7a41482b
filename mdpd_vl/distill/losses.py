"""The distillation losses (paper eqs. 2-7), with ONE pinned reduction.

Reduction: every feature and logits loss is summed over tokens and channels (as eqs. 2, 4, 7
and 3 are written) and averaged over the batch. The paper's weights (1e-4 logits, 6e-5 deep,
4e-5 shallow, supplementary B) only balance against a task loss of order 1 when the
distillation terms are sum-reduced; a mean over N x D elements would make them vanish.
(MGD, whose masked generation MDPD follows, uses the same sum / batch with weight 2e-5.)
Teachers are always detached inside these functions, so a caller cannot forget it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _squared_error(teacher: Tensor, student: Tensor) -> Tensor:
    """(b - s)^2 elementwise, in float32 (a no-op cast in fp32; bf16 sums over N x D would lose digits).
    Autograd keeps only the difference for backward, not a copy of the teacher."""
    return (teacher.detach().float() - student.float()).pow(2)


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
    """
    zs = F.normalize(teacher.detach().flatten(1), dim=-1)
    zb = F.normalize(student.flatten(1), dim=-1)
    log_p = F.log_softmax(zs @ zs.T / temperature, dim=-1)
    log_q = F.log_softmax(zb @ zb.T / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
