"""Evaluators that reproduce the official protocols (see mdpd_vl/eval/README.md).

- `retrieval.evaluate_itr`        image-text Recall@K / medr / Rsum (VSE-infinity, COCO 5-fold)
- `video_retrieval.evaluate_vtr`  video-text retrieval (CLIP4Clip, multi-sentence MSVD)
- `vqa.vqa_accuracy`              official VQA accuracy
- `gqa.gqa_accuracy`              official GQA accuracy (balanced, exact match)
- `grounding.precision_at`        RefCOCO precision@0.5 (IoU, or MDETR's GIoU)
CLI: `python -m mdpd_vl.eval {itr,vtr,vqa,gqa,grounding} ...`. The submodules are imported lazily
so that `import mdpd_vl.eval` does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate_itr": "retrieval",
    "evaluate_vtr": "video_retrieval",
    "vqa_accuracy": "vqa",
    "gqa_accuracy": "gqa",
    "precision_at": "grounding",
    "grounding_report": "grounding",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
