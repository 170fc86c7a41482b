"""Visual question answering as deployed: one answering model, its preprocessing and its answers.

`VisualQuestionAnswerer` holds the module that answers (for MDPD the faded model: image backbone +
connector + cross-modal encoder + answer head; a merged LoRA; or, for evaluation only, a side-kept
model), the preprocessing of the evaluation that produced the run's metrics (image side and
normalisation, or the backbone's own transform; the tokenizer's maximum question length; the batch
size) and the answer vocabulary (label -> answer string). `answer(images, questions)` returns
answer strings. The VQA recipe evaluates its deployed model through this very class and the export
stores the same settings, so a reloaded export answers exactly as the run's evaluation did.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mdpd_vl.deploy.retrieval import ImageLike, build_image_transform, pixels

DEFAULT_BATCH = 64


def default_preprocess(backbone: Any, batch_size: int = DEFAULT_BATCH) -> dict[str, Any]:
    """The backbone's own image transform and question length (what a model without a recipe uses)."""
    return {"image": {"kind": "backbone"}, "text": {"max_length": int(backbone.max_length)},
            "batch_size": int(batch_size)}


class VisualQuestionAnswerer(nn.Module):
    """An answering module + preprocessing + answers; `answer`, `logits`, `input_batches`.

    `preprocess`: `{"image": image_preprocess(...), "text": {"max_length": int}, "batch_size": int}`
    (`mdpd_vl.deploy.retrieval.image_preprocess` builds the image record). `backbone` (for the image
    transform and the tokenizer) defaults to `model.backbone`, which every plain backbone + head has."""

    task = "vqa"

    def __init__(self, model: nn.Module, preprocess: dict[str, Any], answers: Sequence[str], backbone: Any = None):
        super().__init__()
        if not answers:
            raise ValueError("the answer vocabulary is empty")
        self.model, self.preprocess, self.answers = model, preprocess, list(answers)
        self._backbone = backbone if backbone is not None else model.backbone
        self._transform: Any = None

    @property
    def backbone(self) -> Any:
        return self._backbone

    @property
    def batch_size(self) -> int:
        return int(self.preprocess.get("batch_size") or DEFAULT_BATCH)

    @property
    def image_transform(self) -> Any:
        """The evaluation's PIL -> tensor transform."""
        if self._transform is None:
            self._transform = build_image_transform(self.preprocess["image"], self._backbone)
        return self._transform

    def tokenize(self, questions: Sequence[str]) -> dict[str, Tensor]:
        """Token ids + attention mask with the evaluation's tokenizer and maximum question length."""
        return self._backbone.tokenize(list(questions), max_length=self.preprocess["text"]["max_length"])

    def pixels(self, images: Sequence[ImageLike]) -> Tensor:
        """`B x 3 x H x W` from PIL images or image files, decoded as the datasets decode them."""
        return pixels(images, self.image_transform)

    def input_batches(self, images: Sequence[ImageLike] | Tensor, questions: Sequence[str],
                      batch_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """The model's input batches (`images` pixels + question tokens), in order: what `logits` runs."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        bs = int(batch_size or self.batch_size)
        for i in range(0, len(questions), bs):
            chunk = images[i:i + bs]
            pixels = chunk if isinstance(chunk, Tensor) else self.pixels(list(chunk))
            tokens = self.tokenize(questions[i:i + bs])
            yield {"images": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def logits(self, images: Sequence[ImageLike] | Tensor, questions: Sequence[str],
               batch_size: int | None = None) -> Tensor:
        """`N x answers` logits (float32, CPU) of PIL images, image files or a pixel batch."""
        return run_batches(self.model, self.input_batches(images, questions, batch_size))

    def answer(self, images: Sequence[ImageLike] | Tensor, questions: Sequence[str],
               batch_size: int | None = None) -> list[str]:
        """The most likely answer string of each question (argmax over the vocabulary)."""
        return self.answers_of(self.logits(images, questions, batch_size))

    def answers_of(self, logits: Tensor) -> list[str]:
        """Answer strings of `N x answers` logits."""
        return [self.answers[int(i)] for i in logits.argmax(dim=-1).reshape(-1).tolist()]

    # -- export ---------------------------------------------------------------------------------
    def exportable(self) -> bool:
        """The module is a plain backbone + head (faded MDPD, merged LoRA, head-only methods)."""
        from mdpd_vl.export import is_plain

        return is_plain(self.model)

    def export_parts(self, folder: Path) -> dict[str, Any]:
        """Write `model/` (backbone + answer head); return what config.json records (with the answers)."""
        from mdpd_vl.export import export_faded

        if not self.exportable():
            raise TypeError("only a plain backbone + head answers from an export (see exportable())")
        export_faded(self.model, folder / "model", extra_config={"task": self.task})
        return {"parts": {"model": "model"}, "preprocess": self.preprocess, "answers": self.answers}

    @classmethod
    def from_export(cls, folder: Path, config: dict[str, Any]) -> VisualQuestionAnswerer:
        """Rebuild from an export folder (see `export_parts`)."""
        from mdpd_vl.errors import UserError
        from mdpd_vl.export import load_faded

        answers = config.get("answers")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise UserError("needs the answer vocabulary as a list of strings", where=str(folder / "config.json"),
                            field="answers")
        return cls(load_faded(folder / config["parts"]["model"]), config["preprocess"], answers).eval()


@torch.no_grad()
def run_batches(module: nn.Module, batches: Iterable[Any]) -> Tensor:
    """Outputs of `module` (eval mode, no grad) over `batches`, float32, concatenated on the CPU."""
    device = next(module.parameters()).device
    was = module.training
    module.eval()
    try:
        outs = [module(_on(b, device)).float().cpu() for b in batches]
    finally:
        module.train(was)
    if not outs:
        raise ValueError("nothing to answer")
    return torch.cat(outs)


def _on(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in x.items()}
    return x  # precomputed features (the recipe's frozen-encoder evaluation) stay where they are
