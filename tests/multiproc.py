"""Launch a task recipe on two CPU processes (torchrun, gloo) and on one, and check that the two
train what the one trains, and that only the main process writes.

How a recipe adds its two-process test (a few lines; test_multiproc_{itr,vtr,vqa}.py do it):

    import pytest
    from multiproc import compare_runs

    @pytest.mark.slow
    def test_vg_on_two_processes(tmp_path):
        args = ["--set", "data.shapes_scale=tiny", ...]  # tiny and deterministic (see below)
        compare_runs("mdpd_vl.tasks.vg", args, tmp_path, global_batch=8)

`compare_runs` adds `--data-root`, `--output-dir` and `--set train.batch_size / train.max_steps /
train.log_every=1`, then
1. runs `torchrun --standalone --nproc_per_node 2 -m <module>` with batch `global_batch / 2` per
   process from an EMPTY data folder; on the process of rank 1 an audit hook fails every write into
   the data folder or the run folder (one writer);
2. runs `python -m <module>` on one process with batch `global_batch`, reading the data the first
   run built;
3. checks: both exit 0; the two-process run folder holds exactly one results.json and its stdout
   holds one summary (`SUMMARY_MARK`); results.json `training` says 2 processes, the per-process
   batch and the same global batch as the one-process run; one weights digest per process, equal;
   the first `steps` losses of train/metrics.jsonl equal the one-process run's within `rel`
   (relative); the evaluation before training, when recorded, is the same numbers.
It returns both `Launch` records for recipe-specific checks.

What the recipe must do for this to hold: train with `mdpd_vl.engine.train.train`, build shared data
through `ensure_shapes` / `cached_features` (main first) or inside `kit.main_first()` (any other
artefact it caches: VTR's frame counts, VQA's aligned connector), gather the embeddings of in-batch
losses with `mdpd_vl.dist.gather_batch`, weight means over a varying local count with
`mdpd_vl.dist.mean_weight` (VTR's valid frames), run the evaluation before training and everything
after it through `kit.on_main`, write with the kit (`kit.output_dir`, `kit.write_results`, ...), pass
`train_result=` to `kit.results`, print with `kit.show`. The arguments must switch off per-process randomness (token drop, masking, dropout):
each process draws its own, so with it the two runs agree in distribution only.

Also a script: `python tests/multiproc.py [--guard DIR]... -m MODULE ARGS...` runs MODULE as
`python -m` does, with the write guard on every process but the main one (what torchrun starts).
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SUMMARY_MARK = "where things are:"  # the last heading of kit.summary
GUARD_MARK = "one-writer check:"


@dataclass
class Launch:
    """What one launch did: exit status, output, wall seconds and its run folder."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    output_dir: Path

    def tail(self, n: int = 4000) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-n:]}\n--- stderr\n{self.stderr[-n:]}"

    def results_files(self) -> list[Path]:
        return sorted(self.output_dir.rglob("results.json"))

    def results(self) -> dict[str, Any]:
        files = self.results_files()
        assert len(files) == 1, f"expected one results.json under {self.output_dir}, found {files}"
        return json.loads(files[0].read_text())

    def losses(self) -> list[float]:
        """The logged loss of each step (train.log_every=1), from the run's one metrics.jsonl."""
        files = sorted(self.output_dir.rglob("metrics.jsonl"))
        assert len(files) == 1, f"expected one metrics.jsonl under {self.output_dir}, found {files}"
        lines = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
        return [m["loss"] for m in lines if "loss" in m]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MDPD_DATA", "MDPD_CACHE")}
    # one thread per process: two processes on a small machine, and reductions in one order
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _launch(cmd: list[str], output_dir: Path, timeout: float) -> Launch:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return Launch(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0, output_dir)


def run_two_process(module: str, args: Sequence[str], *, output_dir: Path, guard: Sequence[Path] = (),
                    timeout: float = 600) -> Launch:
    """`torchrun --standalone --nproc_per_node 2 -m module args` (gloo on CPUs), writes into `guard`
    folders failing on the process of rank 1."""
    shim = [str(Path(__file__).resolve()), *[a for g in guard for a in ("--guard", str(g))], "-m", module]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *shim, *args]
    return _launch(cmd, output_dir, timeout)


def run_one_process(module: str, args: Sequence[str], *, output_dir: Path, timeout: float = 600) -> Launch:
    """`python -m module args`."""
    return _launch([sys.executable, "-m", module, *args], output_dir, timeout)


def compare_runs(module: str, args: Sequence[str], tmp: Path, *, global_batch: int, steps: int = 3,
                 rel: float = 1e-4, timeout: float = 600) -> tuple[Launch, Launch]:
    """Two processes (batch global_batch / 2 each, empty data folder) against one (batch
    global_batch): every check of the module docstring; returns (two, one)."""
    assert global_batch % 2 == 0, "the global batch is split over two processes"
    data, out2, out1 = tmp / "data", tmp / "two", tmp / "one"
    data.mkdir(parents=True, exist_ok=True)
    assert not any(data.iterdir()), f"{data} must be empty: the two-process run builds the data"

    def argv(out: Path, batch: int) -> list[str]:
        return [*args, "--data-root", str(data), "--output-dir", str(out), "--set", f"train.batch_size={batch}",
                "--set", f"train.max_steps={steps}", "--set", "train.log_every=1"]

    two = run_two_process(module, argv(out2, global_batch // 2), output_dir=out2, guard=[data, out2],
                          timeout=timeout)
    assert two.returncode == 0 and GUARD_MARK not in two.stderr, two.tail()
    one = run_one_process(module, argv(out1, global_batch), output_dir=out1, timeout=timeout)
    assert one.returncode == 0, one.tail()

    assert len(two.results_files()) == 1, two.results_files()
    assert two.stdout.count(SUMMARY_MARK) == 1, two.tail()
    r2, r1 = two.results(), one.results()
    t2, t1 = r2["training"], r1["training"]
    assert (t2["processes"], t2["per_process_batch"], t2["global_batch"]) == (2, global_batch // 2, global_batch), t2
    assert (t1["processes"], t1["global_batch"]) == (1, global_batch), t1
    digests = t2.get("weights_digests") or []
    assert len(digests) == 2 and digests[0] == digests[1], f"final weights differ between the processes: {t2}"

    l2, l1 = two.losses()[:steps], one.losses()[:steps]
    assert len(l2) == len(l1) == steps, (l2, l1)
    for step, (a, b) in enumerate(zip(l2, l1), 1):
        assert abs(a - b) <= rel * max(1.0, abs(b)), f"step {step}: two processes {a}, one process {b}"
    if r2.get("metrics_before_training") is not None or r1.get("metrics_before_training") is not None:
        assert r2["metrics_before_training"] == r1["metrics_before_training"]
    return two, one


# ----------------------------------------------------------------------------- the write guard (a script)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGES = {"os.mkdir": (0,), "os.rename": (0, 1), "os.remove": (0,), "os.rmdir": (0,), "shutil.rmtree": (0,),
            "os.truncate": (0,), "os.symlink": (1,), "os.link": (1,)}  # event -> the paths it changes


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, bytes, os.PathLike))  # not a file descriptor


def _guard(rank: int, folders: list[Path]) -> Any:
    """An audit hook that fails (and reports) a write of this process under `folders`."""

    def inside(path: Any) -> Path | None:
        if not _is_path(path):
            return None
        p = Path(os.fsdecode(path)).resolve()
        return p if any(p == f or f in p.parents for f in folders) else None

    def written(event: str, args: tuple[Any, ...]) -> list[Any]:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
            return [path] if writes else []
        paths = [args[i] for i in _CHANGES.get(event, ())]
        if event == "os.mkdir":  # mkdir(exist_ok=True) of a folder that is there changes nothing
            paths = [p for p in paths if not (_is_path(p) and os.path.isdir(os.fsdecode(p)))]
        return paths

    def hook(event: str, args: tuple[Any, ...]) -> None:
        for path in written(event, args):
            if (p := inside(path)) is not None:
                print(f"{GUARD_MARK} process {rank} is not the main one and wrote {p} ({event})", file=sys.stderr,
                      flush=True)
                raise PermissionError(f"{GUARD_MARK} process {rank} may not write {p}")

    return hook


def _main(argv: list[str]) -> None:
    folders: list[Path] = []
    while argv and argv[0] == "--guard":
        folders.append(Path(argv[1]).resolve())
        argv = argv[2:]
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: multiproc.py [--guard DIR]... -m MODULE ARGS...")
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0 and folders:
        sys.addaudithook(_guard(rank, folders))
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
