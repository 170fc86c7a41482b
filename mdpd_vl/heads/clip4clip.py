"""CLIP4Clip's similarity heads and loss, as reusable modules (no tuning / distillation imports).

Read against ArrowLuo/CLIP4Clip `modules/modeling.py` (`CLIP4Clip._loose_similarity`,
`_mean_pooling_for_similarity_visual`, the seqTransf branch of `from_pretrained`), `modules/
module_cross.py` (`Transformer`, `ResidualAttentionBlock`), `modules/until_module.py` (`CrossEn`,
`init_weights`) and `main_task_retrieval.py` (the logit-scale clamp after every optimizer step).

- Frames are encoded one by one (the image tower sees `B*T` images); `frames_of` / `scatter_frames`
  keep only the valid frames, so a padded frame is never encoded at all.
- `MeanP` (`meanP`): L2-normalise every frame embedding, average the valid frames, L2-normalise.
- `SeqTransf` (`seqTransf`): frame position embeddings added, a stack of CLIP residual attention
  blocks over the frames (padded frames masked out as keys with -1e6, as CLIP4Clip), the input
  added back (residual), then meanP. `init_seq_transf_from_text` copies the text tower's first
  blocks and its positional embedding into it where names and shapes agree (CLIP4Clip copies
  `transformer.resblocks.<i>` for i < cross_num_hidden_layers and `positional_embedding`).
- `ProjectionHead`: what CLIP applies on top of its last block (pooled token -> LayerNorm ->
  projection without bias); `init_projection_from` copies a CLIP tower's own `ln_post`/`proj` or
  `ln_final`/`text_projection` into it, so the tuned model starts from CLIP's embedding.
- Loss: `symmetric_cross_entropy` = (CrossEn(S) + CrossEn(S^T)) / 2 on S = exp(s) t v^T, where the
  learnable `LogitScale` s starts at CLIP's init log(1/0.07) and is clamped at log(100).

Deliberate deviations (named here and in tasks/vtr.md):
- Padded frames are dropped before the image tower instead of being encoded as black images and
  masked afterwards: valid outputs are identical for a LayerNorm/ViT tower, compute is saved, and
  a BatchNorm tower in training mode never sees the padding in its batch statistics.
- The blocks' LayerNorm uses eps 1e-5 (CLIP's, the weights they are copied from) where CLIP4Clip's
  cross module uses its BERT-style LayerNorm with eps 1e-12.
- `LogitScale.clamp_()` is called by the task model before each forward rather than after each
  optimizer step; the value any forward sees is the same.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.registry import Registry

POOLS = ("cls", "last", "mean")
ACTIVATIONS = ("quick_gelu", "gelu")
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's init of logit_scale
CLIP_LOGIT_SCALE_MAX = math.log(100)  # main_task_retrieval.py: clamp_(logit_scale, max=np.log(100))


# ----------------------------------------------------------------------------- frames
def frames_of(video: Any, frame_mask: Tensor | None) -> Any:
    """The valid frames of a `B x T x ...` video batch as one `N x ...` image batch (frame order kept).
    Anything but a tensor (per-frame features computed earlier, `backbones.base.Precomputed`) already
    holds only the valid frames, in that order, and is returned as it is."""
    if not isinstance(video, Tensor):
        return video
    if frame_mask is None:
        return video.flatten(0, 1)
    return video[frame_mask.bool()]


def scatter_frames(values: Tensor, frame_mask: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """Inverse of `frames_of` for per-frame outputs: `N x D` -> `B x T x D`, zeros at padded frames."""
    b, t = shape
    if frame_mask is None:
        return values.reshape(b, t, *values.shape[1:])
    out = values.new_zeros(b, t, *values.shape[1:])
    out[frame_mask.bool()] = values
    return out


def video_shape(video: Any, frame_mask: Tensor | None) -> tuple[int, int]:
    """`(B, T)` of a video batch: the frame mask's shape, else the tensor's first two axes."""
    if frame_mask is not None:
        return int(frame_mask.shape[0]), int(frame_mask.shape[1])
    return int(video.shape[0]), int(video.shape[1])


def masked_frame_mean(frames: Tensor, mask: Tensor | None) -> Tensor:
    """`_mean_pooling_for_similarity_visual`: mean over valid frames (a row with none divides by 1)."""
    if mask is None:
        return frames.mean(dim=1)
    w = mask.to(frames.dtype).unsqueeze(-1)
    return (frames * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def _l2n(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)  # UniPT's CLIP4Clip clamps the norm at 1e-6 too


# ----------------------------------------------------------------------------- similarity heads
class MeanP(nn.Module):
    """Parameter-free meanP: normalise each frame, masked mean over frames, normalise again."""

    def forward(self, frames: Tensor, mask: Tensor | None = None) -> Tensor:
        return _l2n(masked_frame_mean(_l2n(frames), mask))

    def spec(self) -> dict[str, Any]:
        """Recipe for `mdpd_vl.export` (no weights)."""
        return {"target": "mdpd_vl.heads.clip4clip:MeanP", "kwargs": {}}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of OpenAI CLIP and of CLIP4Clip's cross blocks."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-LN block; parameter names match open_clip / OpenAI CLIP resblocks, so that a text
    tower's block state dict loads into it unchanged."""

    def __init__(self, width: int, heads: int, act: str = "quick_gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", _activation(act)), ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x: Tensor, key_bias: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_bias, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SeqTransf(nn.Module):
    """seqTransf: frame position embeddings + CLIP blocks over the frames + residual, then meanP."""

    def __init__(self, width: int, layers: int = 4, heads: int | None = None, max_positions: int = 77,
                 act: str = "quick_gelu"):
        super().__init__()
        heads = heads or max(1, width // 64)  # CLIP4Clip: transformer_heads = width // 64
        if width % heads:
            raise ValueError(f"seqTransf width {width} is not divisible by {heads} heads")
        if layers < 1 or max_positions < 1:
            raise ValueError("seqTransf needs layers >= 1 and max_positions >= 1")
        self.frame_position_embeddings = nn.Embedding(max_positions, width)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act) for _ in range(layers))
        self.pool = MeanP()
        self._kwargs = {"width": width, "layers": layers, "heads": heads, "max_positions": max_positions, "act": act}
        self.apply(_clip4clip_init)

    @property
    def max_positions(self) -> int:
        return self.frame_position_embeddings.num_embeddings

    def temporal(self, frames: Tensor, mask: Tensor | None = None) -> Tensor:
        """`B x T x D` frame embeddings after the temporal transformer (+ the residual input)."""
        t = frames.shape[1]
        if t > self.max_positions:
            raise ValueError(f"{t} frames exceed seqTransf's {self.max_positions} frame positions")
        x = frames + self.frame_position_embeddings.weight[:t].unsqueeze(0)
        key_bias = None
        if mask is not None:  # CLIP4Clip: (1 - video_mask) * -1e6 added to every query's scores
            key_bias = (1.0 - mask.to(x.dtype)) * -1e6
        for block in self.blocks:
            x = block(x, key_bias)
        return x + frames

    def forward(self, frames: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.pool(self.temporal(frames, mask), mask)

    def spec(self) -> dict[str, Any]:
        """Recipe for `mdpd_vl.export` (weights travel separately)."""
        return {"target": "mdpd_vl.heads.clip4clip:SeqTransf", "kwargs": dict(self._kwargs)}


def _clip4clip_init(module: nn.Module) -> None:
    """`PreTrainedModel.init_weights`: Linear / Embedding ~ N(0, 0.02), zero biases, LayerNorm 1 / 0.
    (nn.MultiheadAttention's packed in_proj is not a Linear there either and keeps its own init.)"""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _block_activation(block: nn.Module) -> str | None:
    act = getattr(getattr(block, "mlp", None), "gelu", None)
    if act is None:
        return None
    return "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu" if isinstance(act, nn.GELU) else None


@torch.no_grad()
def init_seq_transf_from_text(head: SeqTransf, blocks: Sequence[nn.Module],
                              positional: Tensor | None = None) -> dict[str, int]:
    """Copy text-tower blocks `0..layers-1` and its positional embedding into `head` where shapes allow.

    A block is copied only when every parameter of ours has a same-named, same-shaped tensor in the
    source block and the head counts agree (CLIP-style resblocks of the same width); the activation
    follows the source block's (QuickGELU for OpenAI weights). Position rows are copied up to the
    shorter of the two tables when widths agree. Returns `{"layers": n, "positions": rows}`."""
    copied, act = 0, None
    for ours, theirs in zip(head.blocks, blocks, strict=False):
        src = theirs.state_dict()
        dst = ours.state_dict()
        heads_src = getattr(getattr(theirs, "attn", None), "num_heads", None)
        if heads_src != ours.attn.num_heads or any(k not in src or src[k].shape != v.shape for k, v in dst.items()):
            continue
        ours.load_state_dict({k: src[k] for k in dst})
        act = _block_activation(theirs) or act
        copied += 1
    if act is not None:  # one activation for the whole stack, the source's
        head._kwargs["act"] = act
        for block in head.blocks:
            block.mlp.gelu = _activation(act)
    rows = 0
    table = head.frame_position_embeddings.weight
    if positional is not None and positional.dim() == 2 and positional.shape[1] == table.shape[1]:
        rows = min(table.shape[0], positional.shape[0])
        table[:rows] = positional[:rows].to(table)
    return {"layers": copied, "positions": rows}


SIM_HEADS: Registry[type[nn.Module]] = Registry("similarity head")
SIM_HEADS.register("meanP", MeanP)
SIM_HEADS.register("seqTransf", SeqTransf)


def build_sim_head(name: str, width: int, **kwargs: Any) -> nn.Module:
    """The similarity head `name` (meanP | seqTransf) over `width`-wide frame embeddings; an unknown
    name is a UserError listing the valid ones (field `sim`)."""
    cls = SIM_HEADS.get(name, field="sim")
    return cls() if cls is MeanP else cls(width, **kwargs)


# ----------------------------------------------------------------------------- per-frame / text head
class ProjectionHead(nn.Module):
    """CLIP's top: one pooled token (`cls` first, `last` last valid = CLIP's EOT, `mean` masked mean)
    -> LayerNorm -> Linear without bias (CLIP's `proj` / `text_projection`)."""

    def __init__(self, in_width: int, embed_dim: int, pool: str = "cls"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(in_width)
        self.proj = nn.Linear(in_width, embed_dim, bias=False)
        self._kwargs = {"in_width": in_width, "embed_dim": embed_dim, "pool": pool}

    def pooled(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pool == "cls":
            return tokens[:, 0]
        if self.pool == "mean":
            return masked_frame_mean(tokens, mask)
        if mask is None:
            return tokens[:, -1]
        last = (mask.long().sum(dim=1) - 1).clamp_min(0)  # valid tokens are a prefix (padding on the right)
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.proj(self.norm(self.pooled(tokens, mask)))

    def spec(self) -> dict[str, Any]:
        """Recipe for `mdpd_vl.export` (weights travel separately)."""
        return {"target": "mdpd_vl.heads.clip4clip:ProjectionHead", "kwargs": dict(self._kwargs)}


def clip_projection(tower: nn.Module) -> tuple[nn.LayerNorm, Tensor] | None:
    """A CLIP tower's own final norm and projection (`width x embed`): open_clip / OpenAI visual
    (`ln_post`, `proj`) or text (`ln_final`, `text_projection`); None when it has neither."""
    for norm_name, proj_name in (("ln_post", "proj"), ("ln_final", "text_projection")):
        norm, proj = getattr(tower, norm_name, None), getattr(tower, proj_name, None)
        if isinstance(proj, nn.Linear) and proj.bias is None:
            proj = proj.weight.t()
        if isinstance(norm, nn.LayerNorm) and isinstance(proj, Tensor) and proj.dim() == 2:
            return norm, proj
    return None


@torch.no_grad()
def init_projection_from(head: ProjectionHead, tower: nn.Module) -> bool:
    """Copy `tower`'s CLIP norm + projection into `head` when the shapes agree; True if copied."""
    found = clip_projection(tower)
    if found is None:
        return False
    norm, proj = found
    if tuple(proj.shape) != (head.proj.in_features, head.proj.out_features) or \
            norm.weight is None or norm.weight.shape != head.norm.weight.shape:
        return False
    head.norm.load_state_dict(norm.state_dict())
    head.proj.weight.copy_(proj.t())
    return True


# ----------------------------------------------------------------------------- loss
class LogitScale(nn.Module):
    """CLIP's learnable log temperature: exp(s) scales the cosine similarities; s <= log(100)."""

    def __init__(self, init: float = CLIP_LOGIT_SCALE_INIT, maximum: float = CLIP_LOGIT_SCALE_MAX):
        super().__init__()
        if init > maximum:
            raise ValueError(f"logit scale init {init} exceeds its maximum {maximum}")
        self.value = nn.Parameter(torch.tensor(float(init)))
        self.maximum = float(maximum)

    @torch.no_grad()
    def clamp_(self) -> None:
        """CLIP4Clip's `torch.clamp_(logit_scale.data, max=np.log(100))` (openai/CLIP issue 46)."""
        self.value.clamp_(max=self.maximum)

    def forward(self) -> Tensor:
        return self.value.exp()


def similarity_logits(text: Tensor, video: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """`texts x videos` logits scale * cos(t, v) (both are L2-normalised here)."""
    return scale * (_l2n(text) @ _l2n(video).t())


def cross_entropy_diag(logits: Tensor, ignore: Tensor | None = None) -> Tensor:
    """CrossEn: mean over rows of -log softmax(row)[diagonal]; `ignore` (bool, same shape) removes
    off-diagonal entries from the softmax (e.g. another caption of the same video)."""
    if ignore is not None:
        eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(ignore & ~eye, float("-inf"))
    return -torch.diagonal(F.log_softmax(logits, dim=-1)).mean()


def symmetric_cross_entropy(logits: Tensor, ignore: Tensor | None = None) -> Tensor:
    """CLIP4Clip's loss: (CrossEn(S) + CrossEn(S^T)) / 2 over the in-batch `texts x videos` logits."""
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"need a square in-batch similarity matrix, got {tuple(logits.shape)}")
    t = None if ignore is None else ignore.t()
    return (cross_entropy_diag(logits, ignore) + cross_entropy_diag(logits.t(), t)) / 2


# ----------------------------------------------------------------------------- deployed video encoder
class VideoEncoder(nn.Module):
    """A frame encoder (images -> `N x E`) run on every valid frame, then a similarity head: what a
    tuned video tower deploys. Input: a `B x T x 3 x H x W` tensor or `{"video", "frame_mask"}`;
    output: `B x E`, L2-normalised."""

    def __init__(self, frame_encoder: nn.Module, sim: nn.Module):
        super().__init__()
        self.frame_encoder = frame_encoder
        self.sim = sim

    def frames(self, video: Any, frame_mask: Tensor | None = None) -> Tensor:
        """Per-frame embeddings `B x T x E` (zeros at padded frames)."""
        y = self.frame_encoder(frames_of(video, frame_mask))
        return scatter_frames(y, frame_mask, video_shape(video, frame_mask))

    def forward(self, video: Tensor | dict[str, Tensor], frame_mask: Tensor | None = None) -> Tensor:
        if isinstance(video, dict):
            video, frame_mask = video["video"], video.get("frame_mask")
        return self.sim(self.frames(video, frame_mask), frame_mask)
