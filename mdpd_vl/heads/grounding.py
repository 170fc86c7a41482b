"""MDETR-style grounding transformer: image map tokens + text tokens -> encoder -> query decoder -> boxes, scores.

Follows ashkamath/mdetr (read at commit ea09acc):
- `models/transformer.py` `Transformer`: image tokens projected to `d_model` (`input_proj`, a 1x1 conv there,
  a Linear on tokens here: the same map), text encoder tokens resized to `d_model` by `FeatureResizer`
  (Linear -> LayerNorm(eps 1e-12) -> dropout), both concatenated; the sine position encoding is added to
  queries/keys of the image part only (zeros for text); post-norm encoder layers (`TransformerEncoderLayer
  .forward_post`); post-norm decoder layers with self-attention, cross-attention to the whole memory
  (`cross_attn_image`, norms `norm1/norm3/norm4`; MDETR's text cross-attention is commented out there and is
  absent here) and a final `decoder.norm` applied to every returned layer (`return_intermediate_dec`);
  the decoder input is zeros with the learned `query_embed` as query position (`pass_pos_and_query`).
- `models/position_encoding.py` `PositionEmbeddingSine(d_model // 2, normalize=True)`.
- `models/mdetr.py` `MDETR`: `class_embed = Linear(d, num_classes + 1)`, `bbox_embed = MLP(d, d, 4, 3)` with a
  sigmoid (normalised cx, cy, w, h), optional `contrastive_align_projection_{image,text}`.
Parameter names mirror the official ones, so an official checkpoint maps key by key (backbones/mdetr.py).

Deliberate differences: batch-first tensors; no image padding mask (inputs are resized to one size, so every
image token is valid); the image position encoding is computed on the token grid directly.
Matching and losses are in `heads/grounding_loss.py`. This module imports no tuning/distill/engine code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdpd_vl.errors import UserError


@dataclass
class GroundingConfig:
    """The grounding transformer and its set losses; defaults are MDETR's (main.py arguments)."""

    d_model: int = field(default=256, metadata={"help": "transformer width (MDETR hidden_dim 256)"})
    nheads: int = field(default=8, metadata={"help": "attention heads"})
    enc_layers: int = field(default=6, metadata={"help": "encoder layers over image + text tokens"})
    dec_layers: int = field(default=6, metadata={"help": "decoder layers over the queries"})
    dim_feedforward: int = field(default=2048, metadata={"help": "FFN width of every layer"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the transformer and the text resizer"})
    num_queries: int = field(default=100, metadata={"help": "learned query slots (boxes proposed per expression)"})
    num_tokens: int = field(
        default=255,
        metadata={"help": "text-token slots of the score head (MDETR num_classes); logits have one more: no-object"},
    )
    aux_loss: bool = field(default=True, metadata={"help": "losses on every decoder layer (MDETR aux_loss)"})
    contrastive_align: bool = field(
        default=False, metadata={"help": "MDETR's query-token contrastive alignment loss (optional here)"}
    )
    contrastive_hdim: int = field(default=64, metadata={"help": "projection width of the contrastive alignment"})
    temperature: float = field(default=0.07, metadata={"help": "temperature of the contrastive alignment"})
    cost_class: float = field(default=1.0, metadata={"help": "matching cost weight: token-span probability"})
    cost_bbox: float = field(default=5.0, metadata={"help": "matching cost weight: L1 box distance"})
    cost_giou: float = field(default=2.0, metadata={"help": "matching cost weight: -GIoU"})
    ce_coef: float = field(default=1.0, metadata={"help": "loss weight: soft token cross-entropy"})
    bbox_coef: float = field(default=5.0, metadata={"help": "loss weight: L1 box"})
    giou_coef: float = field(default=2.0, metadata={"help": "loss weight: 1 - GIoU"})
    align_coef: float = field(default=1.0, metadata={"help": "loss weight: contrastive alignment"})
    eos_coef: float = field(default=0.1, metadata={"help": "relative cross-entropy weight of unmatched queries"})

    def __post_init__(self) -> None:
        for name in ("d_model", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                     "num_tokens", "contrastive_hdim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"must be a positive integer, got {value!r}", field=f"grounding.{name}")
        if self.d_model % self.nheads:
            raise UserError(f"d_model {self.d_model} is not divisible by nheads {self.nheads}",
                            field="grounding.nheads")
        if self.d_model % 4:
            raise UserError(f"d_model must be a multiple of 4 (sine encoding of x and y), got {self.d_model}",
                            field="grounding.d_model")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"must lie in [0, 1), got {self.dropout!r}", field="grounding.dropout")
        for name in ("cost_class", "cost_bbox", "cost_giou", "ce_coef", "bbox_coef", "giou_coef", "align_coef",
                     "eos_coef"):
            if getattr(self, name) < 0:
                raise UserError(f"must be >= 0, got {getattr(self, name)!r}", field=f"grounding.{name}")
        if self.cost_class == self.cost_bbox == self.cost_giou == 0:
            raise UserError("all matching costs are 0", field="grounding.cost_class")
        if not self.temperature > 0:
            raise UserError(f"must be > 0, got {self.temperature!r}", field="grounding.temperature")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GroundingConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}",
                            field="grounding")
        return cls(**values)


def sine_position_embedding(h: int, w: int, d_model: int, *, temperature: float = 10000.0,
                            device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """MDETR's `PositionEmbeddingSine(d_model // 2, normalize=True)` on an unpadded h x w grid: `(h*w) x d_model`,
    row-major, y features then x features, each interleaving sin (even) and cos (odd) channels."""
    feats, eps, scale = d_model // 2, 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    y, x = y / (h + eps) * scale, x / (w + eps) * scale
    dim_t = torch.arange(feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / feats)

    def encode(v: Tensor) -> Tensor:
        p = v[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2)

    return torch.cat((encode(y), encode(x)), dim=-1).reshape(h * w, d_model).to(dtype)


class FeatureResizer(nn.Module):
    """Text tokens -> d_model: Linear -> LayerNorm(eps 1e-12) -> dropout (MDETR `FeatureResizer`)."""

    def __init__(self, in_width: int, out_width: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(in_width, out_width)
        self.layer_norm = nn.LayerNorm(out_width, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.layer_norm(self.fc(x)))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer (MDETR `TransformerEncoderLayer.forward_post`); `pos` is added to q and k."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, padding: Tensor | None = None) -> Tensor:
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask=padding)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer (MDETR `TransformerDecoderLayer.forward_post`): self-attention over the queries,
    cross-attention to the memory (image + text tokens), FFN."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn_image = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                padding: Tensor | None = None) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt)[0]))
        attn = self.cross_attn_image(tgt + query_pos, memory + pos, memory, key_padding_mask=padding)[0]
        tgt = self.norm3(tgt + self.dropout3(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm4(tgt + self.dropout4(ffn))


class Stack(nn.Module):
    """`layers` (+ an optional final `norm`): the containers of the official key layout."""

    def __init__(self, layers: list[nn.Module], norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


@dataclass
class Memory:
    """The encoder output: `tokens` (B x (N_img + L) x d), `pos`, key `padding` (True = pad), `n_image`."""

    tokens: Tensor
    pos: Tensor
    padding: Tensor | None
    n_image: int

    @property
    def text(self) -> Tensor:
        return self.tokens[:, self.n_image:]


class MdetrCore(nn.Module):
    """MDETR's transformer without the text encoder: projections, encoder, decoder, learned queries."""

    def __init__(self, image_width: int, text_width: int, cfg: GroundingConfig):
        super().__init__()
        self.cfg, self.image_width, self.text_width = cfg, image_width, text_width
        d = cfg.d_model
        self.input_proj = nn.Linear(image_width, d)
        self.resizer = FeatureResizer(text_width, d, cfg.dropout)
        self.encoder = Stack([EncoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                              for _ in range(cfg.enc_layers)])
        self.decoder = Stack([DecoderLayer(d, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
                              for _ in range(cfg.dec_layers)], nn.LayerNorm(d))
        self.query_embed = nn.Embedding(cfg.num_queries, d)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # MDETR `Transformer._reset_parameters`: xavier-uniform on every matrix of the transformer
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def encode(self, image_tokens: Tensor, grid: tuple[int, int], text_tokens: Tensor,
               text_valid: Tensor | None) -> Memory:
        """Project, concatenate (image first, as MDETR) and run the encoder."""
        b, n_img = image_tokens.shape[:2]
        if grid[0] * grid[1] != n_img:
            raise ValueError(f"{n_img} image tokens do not fill a {grid[0]}x{grid[1]} grid")
        src = torch.cat([self.input_proj(image_tokens), self.resizer(text_tokens)], dim=1)
        pos_img = sine_position_embedding(*grid, self.cfg.d_model, device=src.device, dtype=src.dtype)
        pos = torch.cat([pos_img.expand(b, -1, -1), src.new_zeros(b, text_tokens.shape[1], src.shape[-1])], dim=1)
        padding = None
        if text_valid is not None and not bool(text_valid.all()):
            padding = torch.cat([text_valid.new_zeros(b, n_img), ~text_valid.bool()], dim=1)
        x = src
        for layer in self.encoder.layers:
            x = layer(x, pos, padding)
        return Memory(x, pos, padding, n_img)

    def decode(self, memory: Memory, intermediate: bool = False) -> list[Tensor]:
        """Decoder outputs after `decoder.norm`: the last layer's, or every layer's (shallow to deep)."""
        b = memory.tokens.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        tgt = torch.zeros_like(query_pos)
        outs = []
        for layer in self.decoder.layers:
            tgt = layer(tgt, memory.tokens, memory.pos, query_pos, memory.padding)
            if intermediate:
                outs.append(tgt)
        assert self.decoder.norm is not None
        # the last layer is normalised last, so a forward hook on the norm sees the final output
        return [self.decoder.norm(t) for t in outs[:-1]] + [self.decoder.norm(tgt)]

    def spec(self) -> dict[str, Any]:
        return {"image_width": self.image_width, "text_width": self.text_width, "cfg": self.cfg.to_dict()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MdetrCore:
        return cls(int(spec["image_width"]), int(spec["text_width"]), GroundingConfig.from_dict(spec["cfg"]))


class MLP(nn.Module):
    """ReLU MLP (MDETR `MLP`): `num_layers` Linear layers, hidden width `hidden`."""

    def __init__(self, in_width: int, hidden: int, out_width: int, num_layers: int):
        super().__init__()
        dims = [in_width] + [hidden] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_width]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


@dataclass
class GroundingOutput:
    """Per query: `boxes` (B x Q x 4, normalised cx, cy, w, h) and `logits` (B x Q x (T + 1), last = no-object).
    `aux` holds the same for the shallower decoder layers; `proj_queries` / `proj_tokens` (L2-normalised) and
    `text_valid` feed the optional contrastive alignment."""

    boxes: Tensor
    logits: Tensor
    aux: list[GroundingOutput] = field(default_factory=list)
    proj_queries: Tensor | None = None
    proj_tokens: Tensor | None = None
    text_valid: Tensor | None = None

    def scores(self) -> Tensor:
        """MDETR `PostProcess`: 1 - p(no-object) per query."""
        return 1.0 - self.logits.softmax(-1)[..., -1]

    def detach(self) -> GroundingOutput:
        return GroundingOutput(self.boxes.detach(), self.logits.detach())


class BoxScoreHead(nn.Module):
    """MDETR's `class_embed` + `bbox_embed` on decoder query tokens. As a task head (`head(tokens, mask)`)
    it returns one packed tensor `B x Q x (4 + T + 1)` (sigmoid boxes, then logits); `unpack` splits it."""

    def __init__(self, in_width: int, num_tokens: int = 255, hidden: int | None = None):
        super().__init__()
        self.in_width, self.num_tokens, self.hidden = in_width, num_tokens, hidden or in_width
        self.class_embed = nn.Linear(in_width, num_tokens + 1)
        self.bbox_embed = MLP(in_width, self.hidden, 4, 3)

    def predict(self, tokens: Tensor) -> GroundingOutput:
        return GroundingOutput(self.bbox_embed(tokens).sigmoid(), self.class_embed(tokens))

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        out = self.predict(tokens)
        return torch.cat([out.boxes, out.logits], dim=-1)

    @staticmethod
    def unpack(packed: Tensor) -> GroundingOutput:
        """The inverse of `forward`'s packing."""
        return GroundingOutput(packed[..., :4], packed[..., 4:])

    def spec(self) -> dict[str, Any]:
        return {"target": "mdpd_vl.heads.grounding:BoxScoreHead",
                "kwargs": {"in_width": self.in_width, "num_tokens": self.num_tokens, "hidden": self.hidden}}


class TokenPassthrough(nn.Module):
    """A tower's task head when the grounding transformer is the real head: the tokens themselves."""

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return tokens

    def spec(self) -> dict[str, Any]:
        return {"target": "mdpd_vl.heads.grounding:TokenPassthrough", "kwargs": {}}


class GroundingTransformer(nn.Module):
    """The whole MDETR head over backbone tokens: `MdetrCore` + `BoxScoreHead` (+ alignment projections)."""

    def __init__(self, image_width: int, text_width: int, cfg: GroundingConfig | None = None):
        super().__init__()
        cfg = cfg or GroundingConfig()
        self.cfg = cfg
        self.core = MdetrCore(image_width, text_width, cfg)
        self.head = BoxScoreHead(cfg.d_model, cfg.num_tokens)
        if cfg.contrastive_align:
            self.contrastive_align_projection_image = nn.Linear(cfg.d_model, cfg.contrastive_hdim)
            self.contrastive_align_projection_text = nn.Linear(cfg.d_model, cfg.contrastive_hdim)

    def forward(self, image_tokens: Tensor, grid: tuple[int, int], text_tokens: Tensor,
                text_valid: Tensor | None = None) -> GroundingOutput:
        memory = self.core.encode(image_tokens, grid, text_tokens, text_valid)
        hs = self.core.decode(memory, intermediate=self.training and self.cfg.aux_loss)
        outs = [self.head.predict(h) for h in hs]
        out = outs[-1]
        out.aux = outs[:-1]
        if self.cfg.contrastive_align:
            out.proj_queries = F.normalize(self.contrastive_align_projection_image(hs[-1]), dim=-1)
            out.proj_tokens = F.normalize(self.contrastive_align_projection_text(memory.text), dim=-1)
            out.text_valid = text_valid
        return out

    def spec(self) -> dict[str, Any]:
        return {"target": "mdpd_vl.heads.grounding:GroundingTransformer",
                "kwargs": {"image_width": self.core.image_width, "text_width": self.core.text_width},
                "cfg": self.cfg.to_dict()}


def positive_map(token_mask: Tensor, num_tokens: int) -> Tensor:
    """MDETR `create_positive_map` for one span per expression: `B x L` bool (the tokens of the referred
    phrase) -> `B x num_tokens` rows summing to 1 (tokens past `num_tokens` cannot be pointed at)."""
    b, n = token_mask.shape
    out = token_mask.new_zeros(b, num_tokens, dtype=torch.float32)
    k = min(n, num_tokens)
    out[:, :k] = token_mask[:, :k].float()
    return out / (out.sum(-1, keepdim=True) + 1e-6)


def top_box(out: GroundingOutput, sizes: Tensor) -> tuple[Tensor, Tensor]:
    """The answer to a referring expression: the top-scoring query's box in pixels (`xyxy`, scaled by the
    image (W, H, W, H) as MDETR `PostProcess`) and its score. `sizes` is `B x 2` (height, width)."""
    from torchvision.ops import box_convert

    scores = out.scores()
    best = scores.argmax(dim=1)
    rows = torch.arange(len(best), device=best.device)
    xyxy = box_convert(out.boxes[rows, best], "cxcywh", "xyxy")
    h, w = sizes.to(xyxy).unbind(-1)
    return xyxy * torch.stack([w, h, w, h], dim=-1), scores[rows, best]
