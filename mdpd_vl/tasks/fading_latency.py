"""Deployed latency of a finished ITR run, re-timed from its export: `python -m mdpd_vl.tasks.fading --retime`.

A run times its deployed towers against the bare backbones inside its own process (3 rounds of one batch):
good enough on an idle machine, but when runs share the CPU the ratio swings by 10-20%, more than the 2% that
"costs the bare backbone" allows. Re-timing every export afterwards, one after another in one quiet process,
with paired rounds (deployed, then bare, alternately; the median of the per-round ratios) gives ratios that can
be compared across rows. Even so, architecturally identical deployments (a linear probe, merged LoRA, merged
low-rank MDPD: backbone + the same heads) measured 1.004 to 1.043 on the shared 2-core CPU, so the record also
holds the FLOPs of one batch both ways (`flops_ratio`), which no other job can move. The bare reference is what the run's own measurement uses: the export's backbones'
per-layer features, without any head or side network. Inputs are the same synthetic batch for both (latency
does not depend on pixel values); `latency.json` in the run folder records it and the report prefers it.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdpd_vl.engine.config import atomic_write_text

LATENCY_FILE = "latency.json"
WORDS = ("small", "big", "red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "left of",
         "above", "the", "a", "and", "next to")


def synthetic_batch(retriever: Any, n: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`n` noise images through the export's own image transform and `n` caption-like token sequences."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = int(retriever.preprocess["image"].get("size") or 224)
    images = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 14)))) for _ in range(n)]
    return retriever.pixels(images), retriever.tokenize(captions)


@torch.no_grad()
def paired_ratio(deployed: Any, bare: Any, rounds: int) -> dict[str, float]:
    """Median over `rounds` of t(deployed) / t(bare), the two timed alternately (after one warm-up each)."""
    deployed(), bare()
    ratios, t_dep, t_bare = [], [], []
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        deployed()
        t1 = time.perf_counter()
        bare()
        t2 = time.perf_counter()
        t_dep.append(t1 - t0), t_bare.append(t2 - t1), ratios.append((t1 - t0) / (t2 - t1))
    return {"ratio": round(statistics.median(ratios), 4), "deployed_s": round(statistics.median(t_dep), 5),
            "bare_s": round(statistics.median(t_bare), 5)}


@torch.no_grad()
def count_flops(fn: Any) -> int:
    """Floating-point operations of one call of `fn` (matrix products and convolutions, as torch's flop
    counter counts them): a cost that, unlike a timing, does not depend on what else the CPU runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def retime(run: str | Path, rounds: int = 9, batch: int = 32) -> dict[str, Any]:
    """Re-time a finished ITR run's export against its bare backbones; writes and returns `latency.json`."""
    from mdpd_vl.export import load_exported

    run = Path(run)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    retriever = load_exported(results["export_dir"]).eval()
    images, texts = synthetic_batch(retriever, batch)
    # a Backbone's forward is its per-layer features: the bare reference the run's own timing uses
    bare_image, bare_text = retriever.image_backbone.eval(), retriever.text_backbone.eval()
    def deployed() -> Any:
        return retriever.image(images), retriever.text(texts)

    def bare() -> Any:
        return bare_image(images), bare_text(texts)

    timing = paired_ratio(deployed, bare, rounds)
    flops_deployed, flops_bare = count_flops(deployed), count_flops(bare)
    record = {**timing, "rounds": rounds, "items": batch, "threads": torch.get_num_threads(),
              "flops_deployed": flops_deployed, "flops_bare": flops_bare,
              "flops_ratio": round(flops_deployed / flops_bare, 5) if flops_bare else None,
              "what": "deployed towers / bare backbones' features, paired rounds, median ratio; FLOPs of one batch"}
    atomic_write_text(run / LATENCY_FILE, json.dumps(record, indent=1) + "\n")
    return record


def load_latency(run: str | Path) -> dict[str, Any] | None:
    """A run's `latency.json`, or None."""
    path = Path(run) / LATENCY_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None
