"""The single-stream cross-modal encoder of CLIP-ViL (VisualBERT style) as one `Backbone`.

Input: `{"images": B x 3 x H x W, "input_ids": B x L, "attention_mask": B x L}` (or `"grid"`: the
image layer's tokens computed earlier, in place of `"images"`). Path, as Paranioar/UniPT
`CLIP-ViL/src/lxrt/modeling.py` (`LXRTEncoder.forward`, visualbert_style, `--xlayers 0 --rlayers 0`):
image backbone -> its grid tokens (default: the deepest layer; CLIP RN's layer4 map is the official
`skip_last_layer` output) -> `VisualConnector` (2-D position embedding + Linear + LayerNorm) ->
concatenated after the question's BERT embeddings (word + position + segment, LayerNorm) -> every
layer of a BERT-class transformers encoder, with one attention mask over [text; visual].
`features()` = the encoder layers' outputs over the joint sequence (hooks, as every backbone);
`padding_mask()` covers both segments (text padding False, visual tokens True); `layer_specs`
are read from the model (no grid: the joint sequence is a 1-D token sequence for the generation
convs). The faded model of any method is this backbone + an answer head: image backbone +
connector + encoder, nothing else.

What trains (the decision, and why). Offline nothing pre-trains the connector: in CLIP-ViL the
`visn_fc` projection and `visual_pos` come with the pre-trained checkpoint and stay frozen under
side-tuning (`trainer_base.unfreeze_parameters` trains `VisualFeatEncoder` only without side
transformers). A connector cannot learn inside a side-tuning run at all: the side networks read
detached layer features, and `backbone_trainable: head` runs the encoder without a graph, so no
gradient reaches anything before it. Training it there would need backward through the whole
frozen encoder (the activations of every layer, the cost side networks exist to avoid; measured
in `mdpd_vl/tasks/vqa_model.py`). Therefore:
1. every run first trains the connector through the frozen encoder in a short, shared alignment
   stage (`tasks/vqa_model.ConnectorAlignment`, our stand-in for the checkpoint CLIP-ViL ships);
   it is the same for every method of a comparison;
2. in the methods then compared the connector is part of the frozen backbone (bit-identical after
   every step), except where the method already back-propagates into the first encoder block
   (LoRA, adapters, norm or bias tuning, full, MDPD `norms_all`): there its projection trains too,
   as CLIP-ViL trains `visn_fc` in its adapter and LoRA runs (the position tables stay frozen, as
   `visual_pos` does there).
The image backbone runs without a graph (and in eval mode) unless one of its own tensors trains
(`full`), so it costs no training memory and its grid tokens can be cached.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone, LayerSpec, Precomputed
from mdpd_vl.backbones.hf import HFText
from mdpd_vl.errors import UserError
from mdpd_vl.heads.crossmodal import VisualConnector, concat_segments

POSITIONS = ("auto", "grid", "none")
MAX_QUESTION_TOKENS = 20  # CLIP-ViL's MAX_VQA_LENGTH / MAX_GQA_LENGTH, [CLS] and [SEP] included


def encoder_mask(model: nn.Module, embeds: Tensor, mask: Tensor) -> Any:
    """The attention mask a transformers encoder expects for `B x N` valid tokens (bidirectional)."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: additive B x 1 x 1 x N mask
        return model.get_extended_attention_mask(mask.long(), mask.shape)
    return create_bidirectional_mask(config=model.config, inputs_embeds=embeds, attention_mask=mask.long())


class CrossModalBackbone(Backbone):
    """Image backbone + visual connector + BERT-class encoder over [question; image] tokens."""

    modality = "image_text"

    def __init__(self, image: Backbone, text: HFText, *, image_layer: int = -1, max_grid: int | None = None,
                 position: str = "auto", max_length: int = MAX_QUESTION_TOKENS, dropout: float | None = None):
        super().__init__()
        if position not in POSITIONS:
            raise UserError(f"unknown position {position!r}; valid: {', '.join(POSITIONS)}", field="position")
        model = text.model
        if not (hasattr(model, "embeddings") and hasattr(model, "encoder")):
            raise UserError(f"{type(model).__name__} is not a BERT-class encoder (needs .embeddings and .encoder)",
                            field="text_backbone")
        if not -image.num_layers <= image_layer < image.num_layers:
            raise UserError(f"image_layer {image_layer} is outside the image backbone's {image.num_layers} layers",
                            field="image_layer")
        # the encoder layers are run here over the joint sequence: the text wrapper's own hooks would
        # keep the last batch's activations alive, and its pooler is never used (the head pools)
        for hook in text._hooks:
            hook.remove()
        text._hooks = []
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.image, self.text = image, text
        self.image_layer = image_layer % image.num_layers
        self.max_length, self.position = max_length, position
        spec = image.layer_specs[self.image_layer]
        use_position = position == "grid" or (position == "auto" and spec.grid is not None and spec.prefix == 0)
        if use_position and spec.grid is None:
            raise UserError("the image layer has no grid for position embeddings", field="position")
        self.max_grid = (max_grid or max(spec.grid)) if use_position else None  # type: ignore[arg-type]
        if dropout is None:
            dropout = float(getattr(model.config, "hidden_dropout_prob", 0.1))
        self.dropout = dropout
        self.connector = VisualConnector(spec.width, self._embedding_width(), max_grid=self.max_grid,
                                         prefix=spec.prefix, dropout=dropout)
        self._visual_counts: dict[tuple[int, ...], int] = {}
        self._setup()

    # -- construction helpers -----------------------------------------------------------------
    def _embedding_width(self) -> int:
        """Width of the question's token embeddings, read by running the embedding layer once."""
        ids = torch.ones(1, 2, dtype=torch.long, device=next(self.text.model.parameters()).device)
        with torch.no_grad():
            return int(self.text.model.embeddings(input_ids=ids).shape[-1])

    def _image_trains(self) -> bool:
        return any(p.requires_grad for p in self.image.parameters())

    # -- Backbone protocol --------------------------------------------------------------------
    def _block_modules(self) -> list[nn.Module]:
        from mdpd_vl.backbones.hf import hf_layer_modules

        return hf_layer_modules(self.text.model)

    def visual_tokens(self, x: dict[str, Tensor]) -> tuple[Tensor, tuple[int, int] | None]:
        """The image layer's tokens `B x N_v x C` and their grid: from `x["grid"]` or the image backbone
        (without a graph unless an image-backbone tensor trains)."""
        spec = self.image.layer_specs[self.image_layer]
        if "grid" in x:
            tokens = x["grid"]
            grid = tuple(x["grid_hw"]) if "grid_hw" in x else spec.grid_for(tokens.shape[1])
            return tokens, grid  # type: ignore[return-value]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._image_trains()):
            tokens = self.image.features(x["images"])[self.image_layer]
        # CNN wrappers record each map's H x W (images of another size or aspect ratio)
        grid = getattr(self.image, "_map_grids", {}).get(self.image_layer) or spec.grid_for(tokens.shape[1])
        return tokens, grid

    def _run(self, x: dict[str, Tensor]) -> Tensor:
        tokens, grid = self.visual_tokens(x)
        visual = self.connector(tokens, grid)
        extra = {"token_type_ids": x["token_type_ids"]} if "token_type_ids" in x else {}
        text = self.text.model.embeddings(input_ids=x["input_ids"], **extra)
        joint, valid = concat_segments(text, x["attention_mask"], visual)
        out = self.text.model.encoder(joint, attention_mask=encoder_mask(self.text.model, joint, valid))
        return out[0]

    def num_visual_tokens(self, x: dict[str, Tensor]) -> int:
        """Visual tokens of input `x`, without running the encoder (memoised per image size)."""
        if "grid" in x:
            return int(x["grid"].shape[1])
        key = tuple(x["images"].shape[1:])
        if key not in self._visual_counts:
            was = self.image.training
            self.image.eval()  # BatchNorm statistics must not see the probe
            with torch.no_grad():
                probe = x["images"][:1]
                self._visual_counts[key] = int(self.image.features(probe)[self.image_layer].shape[1])
            self.image.train(was)
        return self._visual_counts[key]

    def padding_mask(self, x: Any) -> Tensor:
        """`B x (L + N_v)` bool: the question's attention mask, then True for every visual token."""
        if isinstance(x, Precomputed):
            return x.mask
        text = x["attention_mask"].bool()
        visual = torch.ones(text.shape[0], self.num_visual_tokens(x), dtype=torch.bool, device=text.device)
        return torch.cat([text, visual], dim=1)

    def example_input(self, batch_size: int = 2) -> dict[str, Tensor]:
        images = self.image.example_input(batch_size)
        length = max(2, min(8, self.max_length))
        vocab = int(self.text.model.config.vocab_size)
        ids = torch.randint(1, vocab, (batch_size, length), device=images.device)
        mask = torch.ones_like(ids)
        mask[-1, length // 2 :] = 0  # one padded question, so masks are exercised while probing
        return {"images": images, "input_ids": ids, "attention_mask": mask}

    def _layer_spec(self, index: int, tokens: Tensor) -> LayerSpec:
        return LayerSpec(width=int(tokens.shape[-1]))

    def train(self, mode: bool = True) -> CrossModalBackbone:
        """A frozen image backbone stays in eval mode (its grid is a fixed function of the image)."""
        super().train(mode)
        if not self._image_trains():
            self.image.eval()
        return self

    def clone(self) -> CrossModalBackbone:
        """A deep copy whose image backbone has its own layer hooks too: a plain deepcopy keeps hooks
        that fill the original image backbone's store (a merged LoRA copy could not read an image)."""
        dup = super().clone()
        dup.image = self.image.clone()
        return dup

    # -- data helpers ---------------------------------------------------------------------------
    def transform(self, train: bool) -> Any:
        """PIL -> tensor preprocessing of the image backbone."""
        return self.image.transform(train)  # type: ignore[attr-defined]

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        """Questions -> `input_ids`, `attention_mask` ([CLS] q [SEP], at most `max_length` tokens)."""
        return self.text.tokenize(texts, max_length=max_length or self.max_length)

    @staticmethod
    def inputs(images: Tensor, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        """The input dict from an image batch and tokenised questions."""
        return {"images": images, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    # -- rebuild --------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return {"kind": "crossmodal", "image": self.image.spec(), "text": self.text.spec(),
                "image_layer": self.image_layer, "max_grid": self.max_grid, "position": self.position,
                "max_length": self.max_length, "dropout": self.dropout}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> CrossModalBackbone:
        """Rebuild the architecture (random init) from `spec()`."""
        from mdpd_vl.backbones import build_backbone

        text = build_backbone(spec["text"])
        if not isinstance(text, HFText):
            raise UserError("the text part of a crossmodal spec must be a transformers encoder", field="text")
        return cls(build_backbone(spec["image"]), text, image_layer=spec.get("image_layer", -1),
                   max_grid=spec.get("max_grid"), position=spec.get("position", "auto"),
                   max_length=spec.get("max_length", MAX_QUESTION_TOKENS), dropout=spec.get("dropout"))


def build_crossmodal(image: str = "offline", text: str | None = None, pretrained: str | None = None,
                     **kwargs: Any) -> CrossModalBackbone:
    """The cross-modal backbone from names: `image` 'offline' (EfficientNet-Lite0 grid + MiniLM, packaged
    weights, no network) or an open_clip model name (+ `pretrained` tag or file; RN50x4 is CLIP-ViL's);
    `text` a transformers BERT-class name or local folder (default: MiniLM offline, bert-base-uncased
    otherwise, as CLIP-ViL). `kwargs` go to `CrossModalBackbone`."""
    image_bb: Backbone
    if image == "offline":
        from mdpd_vl.backbones.offline import offline_image_backbone

        if pretrained not in (None, "", "offline"):
            raise UserError("the offline image backbone has its own weights; drop --pretrained", field="pretrained")
        image_bb = offline_image_backbone()
        text = text or "offline"
    else:
        import open_clip

        if image not in open_clip.list_models() and not image.startswith(("hf-hub:", "local-dir:")):
            raise UserError(f"unknown image backbone {image!r}: use 'offline' or an open_clip model name",
                            field="backbone")
        from mdpd_vl.backbones.open_clip import OpenClipImage

        image_bb = OpenClipImage(image, pretrained)
    if text == "offline":
        from mdpd_vl.backbones.offline import offline_text_backbone

        text_bb = offline_text_backbone()
    else:
        name = text or "bert-base-uncased"
        text_bb = HFText(name, local_files_only=os.path.isdir(name))
    return CrossModalBackbone(image_bb, text_bb, **kwargs)
