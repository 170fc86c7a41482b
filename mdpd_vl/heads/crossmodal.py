"""CLIP-ViL's single-stream pieces (VisualBERT style): the visual connector, the answer head, the losses.

Read in Paranioar/UniPT `CLIP-ViL/src/lxrt/modeling.py` and `src/tasks/vqa_model.py` (run with
`--llayers 12 --xlayers 0 --rlayers 0 --visualbert_style --use_positional_embedding --pos_num 25`):

- `LinearPositionEmbedding`: two `nn.Embedding(pos_num, visual_feat_dim)` tables, one per grid axis,
  summed and added to the CLIP grid features *in the visual feature width*, before any projection
  -> `GridPositionEmbedding` here (flattened row-major, as the official `permute(0, 2, 3, 1).view`).
- `VisualFeatEncoder` (the `visn_fc` of the grid path): Linear(feat_dim -> hidden) -> LayerNorm
  (eps 1e-12) -> dropout -> `VisualConnector` here (position embedding + that projection).
- `LXRTEncoder.forward`: the question's BERT embeddings and the projected visual tokens are
  concatenated as [text; visual] and run through the 12 BERT layers with one attention mask over
  both segments (visual tokens all valid) -> `concat_segments` (the encoder itself is a backbone,
  `mdpd_vl/backbones/crossmodal.py`).
- `BertPooler` (first token, dense, tanh commented out) then `VQAModel.logit_fc` = Linear(D, 2D) ->
  GeLU -> BertLayerNorm(2D, eps 1e-12) -> Linear(2D, answers), BERT init (normal 0.02, zero bias)
  -> `AnswerHead`. LXMERT's `BertVisualAnswerHead` is the same MLP.
- `VQA.train`: BCEWithLogits against the soft scores times the number of answers (LXMERT's
  `loss * logit.size(1)`: a sum over answers, a mean over the batch) -> `vqa_bce`; GQA's
  `--mce_loss` variant: cross-entropy on the single answer -> `gqa_ce`.

Deliberate deviations:
- No pooler dense. In CLIP-ViL it is a frozen linear map pre-trained with the model; two linear
  maps in a row (pooler, then logit_fc's first Linear) train as one, and no checkpoint supplies ours.
- Token towers with a class token (ViT) get no position embedding by default: their tokens carry the
  tower's own, and the official ViT path adds none (`if "RN" in clip_model_name`).
- `pooling="mean"` (masked mean over both segments) is offered beside the official first token.
- `answer_kl` (side -> backbone logits distillation with temperature) is ours, not CLIP-ViL's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.heads.pooling import masked_mean

LN_EPS = 1e-12  # BertLayerNorm(eps=1e-12) everywhere in CLIP-ViL
INIT_STD = 0.02  # BertConfig.initializer_range, used by init_bert_weights
POOLINGS = ("first", "mean")


def bert_init(module: nn.Module) -> None:
    """LXMERT's `init_bert_weights`: Linear/Embedding ~ N(0, 0.02), biases 0, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=INIT_STD)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class GridPositionEmbedding(nn.Module):
    """pos[h, w] = rows[h] + cols[w], added to grid tokens flattened row-major (CLIP-ViL's
    `LinearPositionEmbedding`); `max_grid` is the official `pos_num` (the longest grid side)."""

    def __init__(self, width: int, max_grid: int):
        super().__init__()
        if max_grid < 1:
            raise ValueError(f"max_grid must be >= 1, got {max_grid}")
        self.max_grid = max_grid
        self.rows = nn.Embedding(max_grid, width)
        self.cols = nn.Embedding(max_grid, width)

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        h, w = grid
        if h * w != tokens.shape[1]:
            raise ValueError(f"{tokens.shape[1]} grid tokens do not form a {h}x{w} grid")
        if max(h, w) > self.max_grid:
            raise ValueError(f"a {h}x{w} grid exceeds the {self.max_grid} positions per axis this "
                             "connector was built with (max_grid); use smaller images or a larger max_grid")
        rows = self.rows(torch.arange(h, device=tokens.device))
        cols = self.cols(torch.arange(w, device=tokens.device))
        pos = (rows[:, None, :] + cols[None, :, :]).reshape(1, h * w, -1)
        return tokens + pos.to(tokens.dtype)


class VisualConnector(nn.Module):
    """Image-layer tokens (`B x (prefix + h*w) x C`) -> visual token embeddings `B x N x D`:
    2-D position embedding on the grid tokens (optional), then Linear(C, D) -> LayerNorm -> dropout."""

    def __init__(self, in_width: int, out_width: int, *, max_grid: int | None = None, prefix: int = 0,
                 dropout: float = 0.1):
        super().__init__()
        self.in_width, self.out_width, self.prefix = in_width, out_width, prefix
        self.position = GridPositionEmbedding(in_width, max_grid) if max_grid else None
        self.proj = nn.Linear(in_width, out_width)
        self.norm = nn.LayerNorm(out_width, eps=LN_EPS)
        self.dropout = nn.Dropout(dropout)
        bert_init(self)

    def projection_parameters(self) -> list[nn.Parameter]:
        """The `visn_fc` part (Linear + LayerNorm): what CLIP-ViL trains when it trains the connector."""
        return [*self.proj.parameters(), *self.norm.parameters()]

    def forward(self, tokens: Tensor, grid: tuple[int, int] | None) -> Tensor:
        if self.position is not None:
            if grid is None:
                raise ValueError("this connector adds grid position embeddings but got no grid")
            head, body = tokens[:, : self.prefix], tokens[:, self.prefix :]
            tokens = torch.cat([head, self.position(body, grid)], dim=1)
        return self.dropout(self.norm(self.proj(tokens)))


def concat_segments(text: Tensor, text_mask: Tensor, visual: Tensor,
                    visual_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """[text; visual] tokens and their `B x (L + N)` bool mask (visual tokens valid unless masked)."""
    if visual_mask is None:
        visual_mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=visual.device)
    joint = torch.cat([text, visual.to(text.dtype)], dim=1)
    return joint, torch.cat([text_mask.bool(), visual_mask.bool()], dim=1)


def pool_tokens(tokens: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """'first': token 0 (the [CLS] of the text segment, CLIP-ViL's pooler input); 'mean': masked mean."""
    if pooling == "first":
        return tokens[:, 0]
    if pooling == "mean":
        return masked_mean(tokens, mask)
    raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")


class AnswerHead(nn.Module):
    """`head(tokens, mask) -> B x answers` logits: pool, then LXMERT's two-layer answer MLP
    (Linear(D, 2D) -> GeLU -> LayerNorm(2D) -> Linear(2D, answers)), BERT init."""

    def __init__(self, in_width: int, num_answers: int, pooling: str = "first", hidden: int | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        if num_answers < 1:
            raise ValueError(f"num_answers must be >= 1, got {num_answers}")
        self.pooling = pooling
        hidden = hidden or 2 * in_width
        self.mlp = nn.Sequential(nn.Linear(in_width, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=LN_EPS),
                                 nn.Linear(hidden, num_answers))
        bert_init(self)

    @property
    def num_answers(self) -> int:
        return self.mlp[-1].out_features

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.mlp(pool_tokens(tokens, mask, self.pooling))

    def spec(self) -> dict[str, Any]:
        """The recipe `mdpd_vl.export.build_head` rebuilds this head from."""
        return {"target": "mdpd_vl.heads.crossmodal:AnswerHead",
                "kwargs": {"in_width": self.mlp[0].in_features, "num_answers": self.num_answers,
                           "pooling": self.pooling, "hidden": self.mlp[0].out_features}}


def vqa_bce(logits: Tensor, target: Tensor) -> Tensor:
    """LXMERT's VQA loss: BCE-with-logits against the soft scores, summed over the answers and
    averaged over the batch (`BCEWithLogitsLoss()(logit, target) * logit.size(1)`)."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(target.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="sum") / logits.shape[0]


def gqa_ce(logits: Tensor, label: Tensor) -> Tensor:
    """Cross-entropy on the single GQA answer, averaged over the questions that have one in the
    vocabulary (`label` -1 = outside it: no gradient, as an all-zero LXMERT target); 0 when none has."""
    valid = label >= 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], label[valid])


def gqa_bce(logits: Tensor, label: Tensor) -> Tensor:
    """CLIP-ViL's default GQA loss: `vqa_bce` against a one-hot target (all zero when `label` is -1)."""
    target = torch.zeros_like(logits)
    valid = label >= 0
    target[valid, label[valid]] = 1.0
    return vqa_bce(logits, target)


def answer_kl(teacher: Tensor, student: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2 over the answers, mean over the batch;
    the teacher is detached (Hinton et al.'s distillation of one answer distribution into another)."""
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} logits differ")
    t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def answer_indices(logits: Tensor) -> Tensor:
    """The predicted answer of each question: `argmax` over the answers (CLIP-ViL's `logit.max(1)`)."""
    return logits.argmax(dim=-1)


__all__ = ["AnswerHead", "GridPositionEmbedding", "VisualConnector", "answer_indices", "answer_kl",
           "bert_init", "concat_segments", "gqa_bce", "gqa_ce", "pool_tokens", "vqa_bce"]
