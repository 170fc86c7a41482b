"""Hierarchical feature-based distillation (paper sec. 3.3): the per-layer losses of the dual path.

Shallow layers imitate (eq. 4): phi(s) = M_up(M_down(s)) regresses the backbone's tokens. Deep layers
generate (eqs. 5-7): masked tokens are replaced by the learnable mask token and G regenerates the
backbone's tokens; only the masked tokens count. The options of `DistillConfig` decide what is
computed (all exact except `gen_width`: `code` learns G's first conv in phi's code width, the same
function class as the paper's G; `bottleneck` moves all of G there and lifts with M_up):
`deep_outputs` (G's second conv everywhere or at the masked tokens only), `fold_up` (the paper's G
without building the D_B-wide masked map), `fuse_loss` (the last map before a loss inside the
squared error).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from mdpd_vl.distill.bottleneck import Bottleneck
from mdpd_vl.distill.config import DistillConfig
from mdpd_vl.distill.generation import GenerationBlock, masked_code_channels
from mdpd_vl.distill.losses import (
    imitation_loss,
    lifted_squared_error,
    masked_generation_loss,
    masked_rows_loss,
)
from mdpd_vl.distill.phases import phase as mark
from mdpd_vl.side.base import SideOutput


def deep_loss(cfg: DistillConfig, phi: Bottleneck, gen: GenerationBlock, token: Tensor | None, teacher: Tensor,
              student: SideOutput, index: int, m: Tensor, v: Tensor | None) -> Tensor:
    """L_deep of one layer (eq. 7): G regenerates the teacher from the masked student.

    gen_width backbone (paper): s_bar = mask(phi(s)) is D_B wide and G maps it to D_B; with `fold_up`
    its first conv runs in the code width (exact, `GenerationBlock.folded_first`). gen_width code: the
    same map with the folded first conv learnt directly (`code_first`; no mask token). gen_width
    bottleneck: the code s M_down is masked, G maps it to d and M_up lifts the result. deep_outputs
    masked: G's second conv (and M_up) only at the masked tokens the loss reads.
    """
    reads = m if v is None else m & v  # the tokens the loss reads
    masked_only = cfg.deep_outputs == "masked"
    with mark("phi"):
        code = student.mapped(index, phi.down)
    if cfg.gen_width == "backbone" and not cfg.fold_up:
        with mark("phi"):
            h = phi.up(code)
        with mark("G"):
            s_bar = _masked(h, m, token, v)  # type: ignore[arg-type]
            if masked_only and cfg.fuse_loss:
                hidden = F.relu(gen.conv1(gen.body_map(s_bar)[0]))
                with mark("losses"):
                    return gen.loss_at(s_bar, reads, teacher, hidden=hidden) / teacher.shape[0]
            rows = gen.forward_at(s_bar, reads) if masked_only else gen(s_bar)
    elif cfg.gen_width in ("backbone", "code"):
        with mark("G"):
            if cfg.gen_width == "code":
                hidden, prefix_in = gen.code_first(code, m, v), lambda p: masked_code_channels(code[:, :p], m[:, :p])
            else:
                hidden = gen.folded_first(code, m, phi.up, token.to(code.dtype), v)  # type: ignore[union-attr]
                prefix_in = lambda p: phi.up(code[:, :p])  # noqa: E731  (prefix tokens: s_bar = phi(s))
            if masked_only and cfg.fuse_loss:
                with mark("losses"):
                    return gen.loss_at(code, reads, teacher, hidden=hidden) / teacher.shape[0]
            rows = gen.forward_at(code, reads, hidden=hidden) if masked_only else _full_second(gen, hidden, code, prefix_in)
    else:  # bottleneck
        with mark("G"):
            code_bar = _masked(code, m, token, v)  # type: ignore[arg-type]
            rows = gen.forward_at(code_bar, reads) if masked_only else gen(code_bar)
        if masked_only and cfg.fuse_loss:
            with mark("losses"):
                return lifted_squared_error(teacher, rows, phi.up, reads)
        with mark("phi"):
            rows = phi.up(rows)
    with mark("losses"):
        if masked_only:
            return masked_rows_loss(teacher, rows, reads)
        return masked_generation_loss(teacher, rows, m, v)


def shallow_loss(cfg: DistillConfig, phi: Bottleneck, teacher: Tensor, student: SideOutput, index: int,
                 v: Tensor | None) -> Tensor:
    """L_sha of one layer (eq. 4): phi(s_l) imitates the teacher (with `fuse_loss`, M_up inside the loss).
    M_down runs on the side network's layout of s_l and is lifted to b_l's tokens (exact)."""
    with mark("phi"):
        code = student.mapped(index, phi.down)
    if not cfg.fuse_loss:
        with mark("phi"):
            lifted = phi.up(code)
        with mark("losses"):
            return imitation_loss(teacher, lifted, v)
    with mark("phi"):
        if v is not None:
            code = code[v.to(code.device)]
    with mark("losses"):
        return lifted_squared_error(teacher, code, phi.up, v)


def _masked(tokens: Tensor, m: Tensor, token: Tensor, valid: Tensor | None) -> Tensor:
    """Masked tokens replaced by the learnable mask token; padding zeroed (acts as G's zero padding)."""
    out = torch.where(m.unsqueeze(-1), token.to(tokens.dtype), tokens)
    if valid is not None:
        out = out * valid.unsqueeze(-1).to(out.dtype)
    return out


def _full_second(gen: GenerationBlock, hidden: Tensor, tokens: Tensor, prefix_in: Callable[[int], Tensor]) -> Tensor:
    """G's output at every token from its first conv's body map: the body through conv2, the prefix
    tokens (never masked) through the centre taps from `prefix_in(p)`, their input in conv1's width."""
    body = gen.conv2(hidden).flatten(2).transpose(1, 2)
    p = tokens.shape[1] - body.shape[1]
    if p == 0:
        return body
    head = gen._centre(gen.conv2, F.relu(gen._centre(gen.conv1, prefix_in(p))))
    return torch.cat([head, body], dim=1)
