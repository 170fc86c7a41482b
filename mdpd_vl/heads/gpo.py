"""VSE-infinity's Generalised Pooling Operator (GPO) and the embedding heads built on it.

GPO learns, per sequence length, a weight for each rank of the per-dimension sorted features:
a sine positional encoding of the rank goes through a small bidirectional GRU, a linear map gives
one score per rank, and a softmax (temperature 0.1) turns the scores into pooling weights. So it
interpolates between mean, max and k-max pooling depending on what the task rewards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def sine_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """`length x dim` sine/cosine encoding of positions 0..length-1 (dim must be even)."""
    if dim % 2:
        raise ValueError(f"positional encoding needs an even width, got {dim}")
    pos = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class GPO(nn.Module):
    """Pool `B x N x D` features with learned weights over per-dimension sorted values."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1):
        super().__init__()
        self.d_pe, self.temperature = d_pe, temperature
        self.gru = nn.GRU(d_pe, d_hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.score = nn.Linear(d_hidden, 1, bias=False)

    def weights(self, lengths: Tensor, max_len: int) -> Tensor:
        """`B x max_len x 1` pooling weights; positions past each length get weight 0."""
        pe = sine_positions(max_len, self.d_pe, lengths.device).unsqueeze(0).expand(len(lengths), -1, -1)
        packed = pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=max_len)
        half = out.shape[-1] // 2
        scores = self.score((out[..., :half] + out[..., half:]) / 2)
        valid = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
        scores = scores.masked_fill(~valid.unsqueeze(-1), -10000.0)
        return torch.softmax(scores / self.temperature, dim=1)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        b, n, _ = features.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        lengths = mask.sum(1).clamp_min(1)
        max_len = int(lengths.max())
        # padded tokens sort to the end (-inf-like), then are zeroed so they never contribute
        filled = features.masked_fill(~mask.unsqueeze(-1), -10000.0)
        ranked = filled.sort(dim=1, descending=True)[0][:, :max_len]
        valid = torch.arange(max_len, device=features.device)[None, :] < lengths[:, None]
        ranked = ranked.masked_fill(~valid.unsqueeze(-1), 0.0)
        return (ranked * self.weights(lengths, max_len)).sum(dim=1)


class VSEHead(nn.Module):
    """tokens -> linear (+ residual 2-layer MLP, as VSE-infinity does for region features) -> GPO.

    In training a random 20% of the valid tokens is dropped (VSE-infinity's size augmentation),
    which keeps GPO from fitting one fixed set size.
    """

    def __init__(self, in_width: int, embed_dim: int, mlp: bool = False, token_drop: float = 0.2):
        super().__init__()
        self.fc = nn.Linear(in_width, embed_dim)
        self.mlp = (
            nn.Sequential(nn.Linear(in_width, embed_dim // 2), nn.ReLU(), nn.Linear(embed_dim // 2, embed_dim))
            if mlp
            else None
        )
        self.token_drop = token_drop
        self.gpo = GPO()
        self._kwargs = {"in_width": in_width, "embed_dim": embed_dim, "mlp": mlp, "token_drop": token_drop}

    def spec(self) -> dict:
        """Recipe for `mdpd_vl.export`: rebuilds this head (weights travel separately)."""
        return {"target": "mdpd_vl.heads.gpo:VSEHead", "kwargs": dict(self._kwargs)}

    def shift_map(self) -> Tensor | None:
        """M with head(tokens + v) = head(tokens) + M v for a per-sample v added to every token: GPO sorts
        each channel (a shift keeps the order) and its weights sum to 1 over the valid tokens. None with the
        MLP branch (not affine)."""
        return None if self.mlp is not None else self.fc.weight

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.fc(tokens)
        if self.mlp is not None:
            x = x + self.mlp(tokens)
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if self.training and self.token_drop > 0:
            keep = torch.rand(mask.shape, device=x.device) >= self.token_drop
            keep[:, 0] = True  # never drop every token of a sample
            mask = mask & keep
        return self.gpo(x, mask)
