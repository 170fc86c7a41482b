"""Deployed task models: what `mdpd_vl.export.load_exported(folder)` returns for a task export.

One registry keyed by the export's task. A task model class exports its parts (each a plain
backbone + head, see `mdpd_vl.export.export_faded`) plus the preprocessing it was evaluated with,
and rebuilds itself from that folder with `from_export(folder, config)`; it exposes the task's
natural calls (ITR: `encode_images` / `encode_texts`; VTR: `encode_videos` / `encode_texts`). A new task is one file here plus one
`DEPLOYED.register` line below. Nothing in this package imports side-network, distillation or
tuning code: a deployed model is backbones + heads + preprocessing, nothing else.
"""

from __future__ import annotations

from mdpd_vl.deploy.grounding import ReferringGrounder
from mdpd_vl.deploy.retrieval import ImageTextRetriever
from mdpd_vl.deploy.video import VideoTextRetriever
from mdpd_vl.deploy.vqa import VisualQuestionAnswerer
from mdpd_vl.registry import Registry

DEPLOYED: Registry[type] = Registry("exported task")
DEPLOYED.register("itr", ImageTextRetriever)
DEPLOYED.register("vtr", VideoTextRetriever)
DEPLOYED.register("vqa", VisualQuestionAnswerer)
DEPLOYED.register("vg", ReferringGrounder)

__all__ = ["DEPLOYED", "ImageTextRetriever", "ReferringGrounder", "VideoTextRetriever", "VisualQuestionAnswerer"]
