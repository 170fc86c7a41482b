"""Readers of the original dataset formats: each writes the canonical index (mdpd_vl/README.md, 'Data').

Every reader is `prepare(raw, out, *, force=False, skip_bad=False, **options) -> PrepReport`: it checks
that each referenced image/video/feature file exists and decodes, compares the split sizes with the
official release (one warning line for a subset), and writes `<out>/<split>.index.json` for all
splits at once, atomically, or nothing (bad inputs: one report, `BadInputError`, exit status 2 in the
CLIs; `skip_bad=True` writes the index without them plus `<out>/prep_report.json`). A rerun with
unchanged inputs and options is a no-op unless `force`. The `data_prep/<name>.py` scripts are thin
CLIs over these. Adding a dataset: one module with `prepare` plus one `DATASETS.register` line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdpd_vl.data.prep import gqa, karpathy, msrvtt, msvd, refcoco, vqav2
from mdpd_vl.data.prep.common import BadInputError, DatasetInfo, PrepReport, Problem
from mdpd_vl.registry import Registry

Prepare = Callable[..., PrepReport]

DATASETS: Registry[Prepare] = Registry("dataset")
DATASETS.register("flickr30k", karpathy.prepare_flickr30k)
DATASETS.register("coco", karpathy.prepare_coco)
DATASETS.register("msrvtt", msrvtt.prepare)
DATASETS.register("msvd", msvd.prepare)
DATASETS.register("refcoco", refcoco.prepare)  # option variant: refcoco | refcoco+ | refcocog
DATASETS.register("vqav2", vqav2.prepare)
DATASETS.register("gqa", gqa.prepare)


def prepare(name: str, raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False,
            **options: Any) -> PrepReport:
    """Run the registered reader `name` (see `DATASETS.names()`)."""
    return DATASETS.get(name, field="dataset")(Path(raw), Path(out), force=force, skip_bad=skip_bad, **options)


def published_at(name: str) -> str:
    """One line naming where the originals of dataset `name` are published ('' when unknown)."""
    infos: dict[str, DatasetInfo] = {
        "flickr30k": karpathy.INFO["flickr30k"], "coco": karpathy.INFO["coco"], "msrvtt": msrvtt.INFO["9k"],
        "msvd": msvd.INFO, "vqav2": vqav2.INFO, "gqa": gqa.INFO,
        "refcoco": DatasetInfo("refcoco", {}, "expressions", refcoco.URLS),
    }
    return infos[name].where_to_get() if name in infos else ""


__all__ = ["DATASETS", "BadInputError", "PrepReport", "Problem", "prepare", "published_at"]
