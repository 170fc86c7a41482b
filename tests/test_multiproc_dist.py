"""`mdpd_vl.dist` on two CPU processes (torchrun, gloo): the gathered in-batch losses and the
synchronised BatchNorm give one process's numbers and gradients on the whole batch; main_first,
on_main and a failure inside it behave as documented. One launch of tests/_dist_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from multiproc import GUARD_MARK, REPO, _env

from mdpd_vl import dist


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "_dist_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_gathered_losses_and_gradients_are_the_whole_batch(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["world"] == 2 and r["gathered_rows"] == 8 and r["ids_equal"] == 1.0
        assert r["loss_diff"] < 1e-5 and r["grad_diff"] < 1e-5, r


@pytest.mark.slow
def test_batchnorm_statistics_come_from_the_global_batch(ranks: list[dict]) -> None:
    for r in ranks:
        for name in ("bn1d", "bn2d", "token"):
            assert r[f"{name}_switched"] == 1 and r[f"{name}_class_restored"] == 1.0, r
            for what in ("out", "input_grad", "param_grad", "running"):
                assert r[f"{name}_{what}_diff"] < 1e-5, (name, what, r)


@pytest.mark.slow
def test_sections_order_the_processes_and_carry_failures(ranks: list[dict]) -> None:
    main, other = ranks
    assert main["marker"] == other["marker"] == "built by the main process"
    assert main["on_main"] == "ran on 0" and other["on_main"] is None
    assert main["inside"] == 3 and other["inside"] is None  # the local batch inside on_main: no hang
    assert main["failure"] == "user error: x: the main process stops here"
    assert other["failure"] == "peer failed 2"  # the exit status cli_entry gives the main process
    assert main["gathered"] == other["gathered"] == [0, 1]


@pytest.mark.slow
def test_the_engine_alone_in_a_section_and_every_process_from_rank_0s_weights(ranks: list[dict]) -> None:
    main, other = ranks
    assert main["alone"] == [1, 12] and other["alone"] is None  # 96 samples / batch 8, one process
    assert main["together_steps"] == other["together_steps"] == 6  # 96 / (2 x 8)
    digests = main["together_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] and other["together_digests"] == digests


def test_one_process_everything_is_a_no_op_or_runs_directly(tmp_path: Path) -> None:
    import torch

    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.gather_batch(x, None)[0] is x
    with dist.main_first():
        (tmp_path / "f").write_text("x")
    assert dist.on_main(lambda a: a + 1, 1) == 2
    assert dist.all_gather_object("me") == ["me"]
    dist.barrier()
    bn = torch.nn.BatchNorm1d(2)
    with dist.synced_batchnorm(bn) as switched:
        assert switched == 0 and type(bn) is torch.nn.BatchNorm1d


def test_the_write_guard_fails_a_write_of_a_process_that_is_not_the_main_one(tmp_path: Path) -> None:
    """The harness's check is real: on rank 1 a write into a guarded folder fails, and says so;
    reading, and mkdir of a folder that is there, pass."""
    guarded = tmp_path / "guarded"
    guarded.mkdir()
    (tmp_path / "writes_here.py").write_text(
        "import pathlib, sys\nfolder = pathlib.Path(sys.argv[1])\nfolder.mkdir(exist_ok=True)\n"
        "print(sorted(p.name for p in folder.iterdir()))\n(folder / 'x.txt').write_text('written')\n")
    for rank in ("0", "1"):
        (guarded / "x.txt").unlink(missing_ok=True)
        env = {**_env(), "RANK": rank, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
        done = subprocess.run([sys.executable, str(REPO / "tests" / "multiproc.py"), "--guard", str(guarded), "-m",
                               "writes_here", str(guarded)], env=env, capture_output=True, text=True, timeout=120)
        assert done.stdout.startswith("[]"), done.stderr[-2000:]  # it read the folder on either rank
        if rank == "0":
            assert done.returncode == 0 and (guarded / "x.txt").read_text() == "written", done.stderr[-2000:]
        else:
            assert done.returncode != 0 and not (guarded / "x.txt").exists()
            assert f"{GUARD_MARK} process 1 is not the main one and wrote {guarded / 'x.txt'}" in done.stderr


def test_results_say_how_many_processes_trained_and_their_batches() -> None:
    from mdpd_vl.tasks import kit

    facts = kit.training({"train": {"batch_size": 8, "grad_accum": 2, "lr_scaling": "linear", "lr": 1e-3}})
    assert facts == {"processes": 1, "batch_size": 8, "grad_accum": 2, "per_process_batch": 16, "global_batch": 16,
                     "lr_scaling": "linear", "lr_factor": 1.0}

    class Result:  # what the engine returns, for two processes that fell out of step
        batch = {**facts, "processes": 2, "global_batch": 32, "lr_factor": 2.0}
        weights_digests = ["a", "b"]

    two = kit.training({}, Result())
    assert two["global_batch"] == 32 and two["weights_in_sync"] is False
    eff = {"trainable_params": 1e6, "train_peak_bytes": None, "train_state_bytes": 2**30, "measured_batch_size": 8}
    line = kit.headline({"method": "m", "dataset": "d", "split": "s", "efficiency": eff, "train_seconds": 1.0,
                         "training": two})
    assert "on 2 processes x batch 16 = global batch 32 (lr x2, lr_scaling linear)" in line
    assert "WARNING: the processes ended with different weights" in line
