"""Masked generation (paper sec. 3.3): per-sample token masks and the generation block G.

Layout conventions (tokens are `B x N x D`, see `backbones/base.py`):
- Image layers have a patch grid (`LayerSpec.grid_for(N)`) plus `prefix` non-grid tokens (a ViT
  class token). G runs Conv3x3 -> ReLU -> Conv3x3 over the grid. Prefix tokens have no
  neighbours, so they take a per-token path that uses the SAME weights: a 3x3 conv with zero
  padding applied to a 1x1 map only sees its centre tap, so the prefix path is
  `centre2(relu(centre1(x)))` - no extra parameters.
- Text layers have no grid: G is Conv1d(k=3) -> ReLU -> Conv1d(k=3) along the sequence.
- Prefix tokens are never masked: a per-token path cannot regenerate a token from its
  neighbours, so masking it would only teach G a constant. The ratio lambda applies to grid
  (or sequence) tokens.

What the deep loss needs (`forward_at`): the loss reads G's output at the masked tokens only. The
first conv must run over the whole grid (the second conv reads each masked token's neighbours), but
the second conv is evaluated only at the masked tokens (im2col rows of the hidden map), and prefix
tokens, never masked, are skipped. `folded_first` computes the first conv of the paper's G on the
masked phi(s) without building that D_B-wide map (see its docstring).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.backbones.base import LayerSpec


def draw_token_mask(
    batch: int, num_tokens: int, ratio: float, generator: torch.Generator, prefix: int = 0
) -> Tensor:
    """`B x N` bool mask, True = replace by the mask token: m_i = 1 iff r_i < lambda (eq. 5).

    Drawn on the CPU from `generator` (so masks are reproducible on any device); the first
    `prefix` tokens are never masked.
    """
    r = torch.rand(batch, num_tokens, generator=generator)
    mask = r < ratio
    if prefix:
        mask[:, :prefix] = False
    return mask


class GenerationBlock(nn.Module):
    """G: regenerate the backbone's tokens from masked, width-aligned side tokens.

    `in_width` / `out_width` default to the layer's width (the paper: G works on phi(s), D_B wide);
    `distill.gen_width: bottleneck` builds it on phi's code width d instead (`DualPath`).
    """

    def __init__(self, spec: LayerSpec, hidden: int, in_width: int | None = None, out_width: int | None = None):
        super().__init__()
        self.spec = spec
        in_width = in_width or spec.width
        out_width = out_width or spec.width
        conv = nn.Conv1d if spec.grid is None else nn.Conv2d
        self.conv1: nn.Module = conv(in_width, hidden, kernel_size=3, padding=1)
        self.conv2: nn.Module = conv(hidden, out_width, kernel_size=3, padding=1)

    @staticmethod
    def num_params(width: int, hidden: int, text: bool, out_width: int | None = None) -> int:
        """Analytic count: two convs (3 taps for text, 3x3 for grids), both with bias; `width` is the
        input width, `out_width` the output's (default: the same)."""
        taps = 3 if text else 9
        out = width if out_width is None else out_width
        return taps * width * hidden + hidden + taps * hidden * out + out

    def forward(self, tokens: Tensor) -> Tensor:
        """`B x N x D_in` -> `B x N x D_out` at every token."""
        b, n, d = tokens.shape
        grid = self.spec.grid_for(n)
        if grid is None:
            x = tokens.transpose(1, 2)  # B x D x N
            return self.conv2(F.relu(self.conv1(x))).transpose(1, 2)
        p = n - grid[0] * grid[1]
        body = tokens[:, p:].transpose(1, 2).reshape(b, d, grid[0], grid[1])
        out = self.conv2(F.relu(self.conv1(body))).flatten(2).transpose(1, 2)
        if p == 0:
            return out
        head = self._centre(self.conv2, F.relu(self._centre(self.conv1, tokens[:, :p])))
        return torch.cat([head, out], dim=1)

    def body_map(self, tokens: Tensor) -> tuple[Tensor, int]:
        """(the non-prefix tokens as a `B x D x H x W` map, or `B x D x N` for text; the prefix count)."""
        b, n, d = tokens.shape
        grid = self.spec.grid_for(n)
        if grid is None:
            return tokens.transpose(1, 2), 0
        p = n - grid[0] * grid[1]
        return tokens[:, p:].transpose(1, 2).reshape(b, d, grid[0], grid[1]), p

    def forward_at(self, tokens: Tensor, positions: Tensor, hidden: Tensor | None = None) -> Tensor:
        """G's output at `positions` only (`B x N` bool, never True on prefix tokens): `M x D_out`, rows
        in the order of `tokens[positions]`. Equals `self(tokens)[positions]`.

        `hidden`: the first conv's output map (after ReLU) when the caller computed it otherwise
        (`folded_first`); `tokens` is then only read for its shape.
        """
        if hidden is None:
            x, p = self.body_map(tokens)
            hidden = F.relu(self.conv1(x))
        else:
            p = tokens.shape[1] - _spatial_size(hidden)
        return self.second_at(hidden, positions[:, p:])

    def second_at(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """The second conv at `positions` (`B x N_body` bool) of the hidden map: `M x D_out`."""
        conv = self.conv2
        return _ConvAtRows.apply(hidden, positions.to(hidden.device), conv.weight, conv.bias)  # type: ignore[union-attr]

    def loss_at(self, tokens: Tensor, positions: Tensor, teacher: Tensor, hidden: Tensor | None = None) -> Tensor:
        """sum over `positions` of ||teacher - G(tokens)||^2 (the deep loss before its weight and batch
        mean) with the second conv inside the squared error: nothing D_out wide is kept for backward."""
        if hidden is None:
            x, p = self.body_map(tokens)
            hidden = F.relu(self.conv1(x))
        else:
            p = tokens.shape[1] - _spatial_size(hidden)
        conv, positions = self.conv2, positions.to(hidden.device)
        return _ConvRowsSquaredError.apply(hidden, positions[:, p:], conv.weight, conv.bias,  # type: ignore[union-attr]
                                           teacher.detach(), positions)

    def folded_first(self, code: Tensor, mask: Tensor, up: nn.Linear, mask_token: Tensor,
                     valid: Tensor | None = None) -> Tensor:
        """relu(conv1(s_bar)) of the paper's G, where s_bar = where(mask, t, M_up(code)) (times `valid`),
        computed in the code width: conv1 is linear, so on every token
        W1 s_bar = (W1 U)(code * (1 - m)) + (W1 c)(1 - m) + (W1 t) m
        (U, c: M_up's weight and bias; t: the mask token), i.e. one conv with d + 2 input channels over
        [code * (1 - m), 1 - m, m]. Zero padding stays zero, so the result is exactly the D_B-wide
        conv's, without building s_bar. Returns the body's hidden map (prefix tokens excluded).
        """
        conv = self.conv1
        w = conv.weight  # type: ignore[union-attr]  # hidden x D_B x taps...
        # [U | c | t]^T (d + 2 x D_B) times each hidden channel's D_B x taps slice: a view of the weight,
        # so autograd keeps no copy of it (an einsum would save permuted copies)
        lift = torch.cat([up.weight, up.bias.unsqueeze(1), mask_token.to(up.weight.dtype).unsqueeze(1)], dim=1)
        weight = torch.matmul(lift.t(), w.flatten(2)).reshape(w.shape[0], lift.shape[1], *w.shape[2:])
        x, _ = self.body_map(masked_code_channels(code, mask, valid))
        run = F.conv1d if x.dim() == 3 else F.conv2d
        return F.relu(run(x, weight, conv.bias, padding=1))

    def code_first(self, code: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
        """relu(conv1(.)) over [code * (1 - m), 1 - m, m] with conv1's own d + 2 input channels
        (`gen_width: code`): the map `folded_first` builds, with the folded weight learnt directly.
        Returns the body's hidden map (prefix tokens excluded)."""
        x, _ = self.body_map(masked_code_channels(code, mask, valid))
        return F.relu(self.conv1(x))

    @staticmethod
    def _centre(conv: nn.Module, x: Tensor) -> Tensor:
        """A 3x3 conv applied to isolated tokens (1x1 maps with zero padding) = its centre tap."""
        weight = conv.weight[:, :, 1, 1]  # type: ignore[index]
        return F.linear(x, weight, conv.bias)  # type: ignore[arg-type]


def masked_code_channels(code: Tensor, mask: Tensor, valid: Tensor | None = None) -> Tensor:
    """`B x N x (d + 2)`: [code * (1 - m), 1 - m, m], zero on padding (`valid` False): what the first conv
    of G sees in the code width (the bias and the mask token of the paper's map become the weights of
    the two indicator channels)."""
    keep = (~mask).unsqueeze(-1).to(code.dtype)
    channels = torch.cat([code * keep, keep, 1.0 - keep], dim=-1)
    if valid is not None:
        channels = channels * valid.unsqueeze(-1).to(channels.dtype)
    return channels


def _columns(hidden: Tensor) -> Tensor:
    """im2col of a `B x C x H x W` (or `B x C x N` text) map for a 3-tap / 3x3 conv with zero padding:
    `B x (C * taps) x positions`, channel-major like a conv weight flattened from dim 1."""
    if hidden.dim() == 3:
        return F.unfold(hidden.unsqueeze(-1), (3, 1), padding=(1, 0))
    return F.unfold(hidden, 3, padding=1)


class _ConvAtRows(torch.autograd.Function):
    """A 3-tap / 3x3 conv (zero padding) evaluated at some positions of its input map only.

    Forward: im2col rows of the chosen positions times the flattened weight. Only the input map is
    saved for backward (its im2col rows are rebuilt there), so evaluating half the positions costs
    half the multiply-adds and no more saved bytes than the full conv, which saves the same map.
    Computes in the map's dtype (bf16 under autocast) and returns gradients in each input's dtype.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, positions: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(hidden, positions, weight)
        ctx.has_bias = bias is not None
        rows = _columns(hidden).transpose(1, 2)[positions]
        w = weight.flatten(1).to(hidden.dtype)
        return F.linear(rows, w, None if bias is None else bias.to(hidden.dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None]:
        hidden, positions, weight = ctx.saved_tensors
        grad = grad.to(hidden.dtype)
        w = weight.flatten(1).to(hidden.dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            rows = _columns(hidden).transpose(1, 2)[positions]
            grad_weight = (grad.transpose(0, 1) @ rows).reshape(weight.shape).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad.sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_hidden = _fold_rows(grad @ w, positions, hidden)
        return grad_hidden, None, grad_weight, grad_bias


class _ConvRowsSquaredError(torch.autograd.Function):
    """sum over the chosen positions of ||t - conv(hidden)||^2 for a 3-tap / 3x3 conv (zero padding),
    keeping nothing D wide for backward: the im2col rows, the conv output there and the difference
    are rebuilt in backward from the hidden map (saved anyway by the ReLU before it) and the teacher
    (alive anyway). `body` marks the positions in the map, `reads` the same tokens in the teacher."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, body: Tensor, weight: Tensor, bias: Tensor | None, teacher: Tensor,
                reads: Tensor) -> Tensor:
        ctx.save_for_backward(hidden, body, weight, bias, teacher, reads)
        return _conv_rows_residual(hidden, body, weight, bias, teacher, reads)[0].pow(2).sum()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None, None, None]:
        hidden, body, weight, bias, teacher, reads = ctx.saved_tensors
        r, rows = _conv_rows_residual(hidden, body, weight, bias, teacher, reads)
        g = (r * (-2.0 * grad)).to(hidden.dtype)  # d loss / d conv output at the rows
        grad_w = (g.t() @ rows).reshape(weight.shape).to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_b = g.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        grad_h = _fold_rows(g @ weight.flatten(1).to(hidden.dtype), body, hidden) if ctx.needs_input_grad[0] else None
        return grad_h, None, grad_w, grad_b, None, None


def _conv_rows_residual(hidden: Tensor, body: Tensor, weight: Tensor, bias: Tensor | None, teacher: Tensor,
                        reads: Tensor) -> tuple[Tensor, Tensor]:
    rows = _columns(hidden).transpose(1, 2)[body]
    with torch.autocast(hidden.device.type, enabled=False):
        out = F.linear(rows, weight.flatten(1).to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    acc = torch.float64 if teacher.dtype == torch.float64 or out.dtype == torch.float64 else torch.float32
    return teacher[reads].to(acc) - out.to(acc), rows


def _fold_rows(grad_rows: Tensor, positions: Tensor, hidden: Tensor) -> Tensor:
    """The adjoint of `_columns(hidden).transpose(1, 2)[positions]`: scatter the rows' gradients back
    into im2col layout and fold (sum the overlapping taps) onto the map."""
    b, spatial = hidden.shape[0], hidden.shape[2:]
    cols = grad_rows.new_zeros(b, int(torch.tensor(spatial).prod()), grad_rows.shape[1])
    cols[positions] = grad_rows
    cols = cols.transpose(1, 2)
    if hidden.dim() == 3:
        return F.fold(cols, (spatial[0], 1), (3, 1), padding=(1, 0)).squeeze(-1)
    return F.fold(cols, tuple(spatial), 3, padding=1)


def _spatial_size(hidden: Tensor) -> int:
    return int(hidden.shape[2]) if hidden.dim() == 3 else int(hidden.shape[2] * hidden.shape[3])
