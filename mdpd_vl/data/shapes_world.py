"""The synthetic shapes world: a seeded, offline stand-in for every dataset the project reads.

`build_shapes(root, tasks=...)` samples scenes (`shapes_scenes`), words them (`shapes_text`, `shapes_qa`),
draws them (`shapes_render`), writes the ORIGINAL formats under `root/raw/` (`shapes_formats`) and
then builds the canonical indexes with the same `mdpd_vl.data.prep` readers real data goes through,
one folder per task (`TASK_DIRS`). Each task builds alone, on first use (`ensure_shapes(root,
tasks=["itr"])` writes no video), from its own random stream, so the bytes do not depend on which
tasks were built before. Test (and val) scenes are resampled until no caption of one
scene also fits another: the share of such ambiguous captions is measured and reported.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mdpd_vl import dist
from mdpd_vl.atomic import guard_writes, write_text
from mdpd_vl.data import shapes_formats as fmt
from mdpd_vl.data.shapes_qa import questions
from mdpd_vl.data.shapes_scenes import (
    Scene,
    perturb,
    place,
    sample_free_scene,
    sample_scene,
    sample_video_scene,
)
from mdpd_vl.data.shapes_text import (
    ambiguous_share,
    claim_matches,
    image_captions,
    referring_expressions,
    video_captions,
    video_claim_matches,
)
from mdpd_vl.errors import UserError

GENERATOR_VERSION = 1
# Bumped when one task's generator or its size at a scale changes: only that task is rebuilt in an
# existing world (the others keep their files). A task not named here is at version 1.
TASK_VERSIONS: dict[str, int] = {}
MARKER = "shapes_world.json"  # the build report; its presence marks a complete build
STAMP = "SHAPES_WORLD.txt"  # inside raw/: only folders carrying it are ever deleted
RAW_DIR = "raw"
# task -> folder of its canonical indexes under the shapes root (what the task recipes read)
TASK_DIRS: dict[str, str] = {
    "itr": "itr",
    "msrvtt": "vtr_msrvtt",
    "msvd": "vtr_msvd",
    "vqa": "vqa",
    "gqa": "gqa",
    "refcoco": "refcoco",
}
MAX_TRIES = 300  # resampling attempts per scene before an ambiguous one is accepted (and reported)


@dataclass(frozen=True)
class Scale:
    """How much of the world to generate."""

    itr: tuple[int, int, int]  # train, val, test images (5 captions each)
    msrvtt: tuple[int, int]  # videos, of which JSFUSION test
    msvd: tuple[int, int, int]  # train, val, test videos
    vqa: tuple[int, int]  # train2014, val2014 images
    gqa: tuple[int, int, int]  # train, val, testdev images
    refcoco: tuple[int, int, int, int]  # train, val, testA, testB images
    captions: int = 5
    msrvtt_captions: int = 10
    msvd_captions: tuple[int, int] = (3, 12)  # variable number per video
    questions: int = 3
    image_side: int = 128
    video_side: int = 64
    frames: tuple[int, int] = (8, 16)
    sibling_prob: float = 0.4  # share of scenes drawn as a hard negative of an earlier one


SCALES: dict[str, Scale] = {
    "tiny": Scale(itr=(40, 10, 10), msrvtt=(6, 2), msvd=(4, 1, 1), vqa=(12, 6), gqa=(8, 4, 4),
                  refcoco=(8, 3, 3, 3), msrvtt_captions=5, msvd_captions=(2, 6)),
    "default": Scale(itr=(1000, 100, 200), msrvtt=(100, 20), msvd=(70, 10, 20), vqa=(400, 100),
                     gqa=(300, 60, 60), refcoco=(300, 40, 40, 40)),
}
# default, with a RefCOCO training split of 2,000 images (11,235 expressions) instead of 300: the probe of
# tasks/vg.md of whether the grounding head generalises from more data; every other task as default
SCALES["large"] = replace(SCALES["default"], refcoco=(2000, 40, 40, 40))


@dataclass
class ShapesReport:
    """What `build_shapes` made: counts per task, ambiguity shares, the folders, the time it took."""

    root: str
    scale: str
    seed: int
    version: int = GENERATOR_VERSION
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    ambiguous: dict[str, float] = field(default_factory=dict)
    task_dirs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    up_to_date: bool = False
    tasks: list[str] = field(default_factory=list)  # the tasks whose raw files and indexes are complete
    task_versions: dict[str, int] = field(default_factory=dict)  # TASK_VERSIONS of the built tasks


def _rng(seed: int, task: str) -> np.random.Generator:
    """An independent stream per task, so that changing one task never shifts another."""
    return np.random.default_rng([seed, *task.encode()])


# ---------------------------------------------------------------------------------- sampling
def _collides(claims: list, canonical, accepted: list[tuple[Any, list]], matches) -> bool:
    for other, other_claims in accepted:
        if any(matches(c, other) for c in claims) or any(matches(c, canonical) for c in other_claims):
            return True
    return False


def _image_split(n: int, scale: Scale, rng: np.random.Generator, unique: bool) -> list[tuple[Scene, list]]:
    """`n` placed scenes with their (caption, claim) lists; `unique` resamples colliding scenes."""
    out: list[tuple[Scene, list]] = []
    seen: list[tuple[Any, list]] = []
    for _ in range(n):
        for _ in range(MAX_TRIES):
            scene = None
            bases = [s for s, _ in out if len(s.things) > 1]
            if bases and rng.random() < scale.sibling_prob:
                scene = perturb(bases[int(rng.integers(len(bases)))], rng)
            scene = scene or sample_scene(rng)
            caps = image_captions(scene, rng, scale.captions)
            claims = [c for _, c in caps]
            if not unique or not _collides(claims, scene.canonical, seen, claim_matches):
                break
        seen.append((scene.canonical, claims))
        out.append((place(scene, scale.image_side, rng), caps))
    return out


def _video_split(n: int, scale: Scale, rng: np.random.Generator, unique: bool, n_caps) -> list[tuple[Any, list]]:
    out: list[tuple[Any, list]] = []
    seen: list[tuple[Any, list]] = []
    for _ in range(n):
        for _ in range(MAX_TRIES):
            scene = sample_video_scene(rng, scale.video_side, scale.frames)
            caps = video_captions(scene, rng, n_caps())
            claims = [c for _, c in caps]
            if not unique or not _collides(claims, scene.canonical, seen, video_claim_matches):
                break
        seen.append((scene.canonical, claims))
        out.append((scene, caps))
    return out


def _share(split: list[tuple[Any, list]], matches) -> float:
    claims = [c for _, caps in split for _, c in caps]
    return round(ambiguous_share(claims, [s.canonical for s, _ in split], matches), 4)


# ------------------------------------------------------------------------------------- tasks
# Each writer fills one raw folder (`folder`) from its own random stream, so tasks build alone, in
# any order, and give the same bytes as when they are built together.
def _itr(folder: Path, scale: Scale, seed: int, report: ShapesReport) -> None:
    rng = _rng(seed, "itr")
    splits = {name: _image_split(n, scale, rng, unique=name != "train")
              for name, n in zip(("train", "val", "test"), scale.itr)}
    for name in ("val", "test"):
        report.ambiguous[f"itr_{name}"] = _share(splits[name], claim_matches)
    fmt.write_karpathy(folder, {k: [(s, [t for t, _ in c]) for s, c in v] for k, v in splits.items()},
                       scale.image_side)
    report.counts["itr"] = {k: len(v) for k, v in splits.items()}


def _msrvtt(folder: Path, scale: Scale, seed: int, report: ShapesReport) -> None:
    rng = _rng(seed, "msrvtt")
    n, n_test = scale.msrvtt
    train = _video_split(n - n_test, scale, rng, False, lambda: scale.msrvtt_captions)
    test = _video_split(n_test, scale, rng, True, lambda: scale.msrvtt_captions)
    # JSFUSION keeps one caption per test video: measure on exactly those
    report.ambiguous["msrvtt_test"] = _share([(s, caps[:1]) for s, caps in test], video_claim_matches)
    fmt.write_msrvtt(folder, [(s, [t for t, _ in c]) for s, c in train + test], n_test)
    report.counts["msrvtt"] = {"train": n - n_test, "test": n_test}


def _msvd(folder: Path, scale: Scale, seed: int, report: ShapesReport) -> None:
    rng = _rng(seed, "msvd")
    lo, hi = scale.msvd_captions
    splits, ids = {}, {}
    for name, count in zip(("train", "val", "test"), scale.msvd):
        splits[name] = _video_split(count, scale, rng, name != "train", lambda: int(rng.integers(lo, hi + 1)))
        ids[name] = [f"shp{rng.integers(16**8):08x}_{int(rng.integers(60))}_{int(rng.integers(60, 120))}"
                     for _ in range(count)]
    report.ambiguous["msvd_test"] = _share(splits["test"], video_claim_matches)
    fmt.write_msvd(folder, {k: [(s, [t for t, _ in c]) for s, c in v] for k, v in splits.items()}, ids)
    report.counts["msvd"] = {k: len(v) for k, v in splits.items()}


def _vqa(folder: Path, scale: Scale, seed: int, report: ShapesReport) -> None:
    rng = _rng(seed, "vqa")
    side = scale.image_side
    subsets = {}
    for subset, n, first_id in (("train2014", scale.vqa[0], 100001), ("val2014", scale.vqa[1], 500001)):
        entries = []
        for i in range(n):
            scene = sample_free_scene(rng, side)
            entries.append((scene, first_id + i, questions(scene, rng, side, scale.questions)))
        subsets[subset] = entries
    fmt.write_vqa(folder, subsets, side, rng)
    report.counts["vqa"] = {k[:-4]: sum(len(q) for _, _, q in v) for k, v in subsets.items()}  # train, val


def _gqa(folder: Path, scale: Scale, seed: int, report: ShapesReport) -> None:
    rng = _rng(seed, "gqa")
    side = scale.image_side
    splits, image_id = {}, 2300001
    for name, n in zip(("train", "val", "testdev"), scale.gqa):
        entries = []
        for _ in range(n):
            scene = sample_free_scene(rng, side)
            entries.append((scene, str(image_id), questions(scene, rng, side, scale.questions, gqa=True)))
            image_id += 1
        splits[name] = entries
    fmt.write_gqa(folder, splits, side, rng)
    report.counts["gqa"] = {k: sum(len(q) for _, _, q in v) for k, v in splits.items()}


def _refcoco(folder: Path, scale: Scale, seed: int, report: ShapesReport) -> None:
    rng = _rng(seed, "refcoco")
    side, entries, image_id = scale.image_side, [], 700001
    counts: dict[str, int] = {}
    for split, n in zip(("train", "val", "testA", "testB"), scale.refcoco):
        for _ in range(n):
            for _ in range(MAX_TRIES):  # a scene whose things can all be told apart somehow
                scene = sample_free_scene(rng, side, min_things=2)
                targets = [(i, referring_expressions(scene, i, rng, side, k=int(rng.integers(1, 4))))
                           for i in range(len(scene.placed))]
                targets = [(i, s) for i, s in targets if s]
                if targets:
                    break
            entries.append((scene, image_id, split, targets))
            counts[split] = counts.get(split, 0) + sum(len(s) for _, s in targets)
            image_id += 1
    fmt.write_refcoco(folder, entries, side)
    report.counts["refcoco"] = counts


WRITERS: dict[str, Callable[[Path, Scale, int, ShapesReport], None]] = {
    "itr": _itr, "msrvtt": _msrvtt, "msvd": _msvd, "vqa": _vqa, "gqa": _gqa, "refcoco": _refcoco,
}
# optional packages a task's raw files need: task -> (module, what it writes, extra that installs it)
REQUIRES: dict[str, tuple[str, str, str]] = {
    "msrvtt": ("av", "videos", "video"),
    "msvd": ("av", "videos", "video"),
}


# ------------------------------------------------------------------------------- the indexes
def _prepare(task: str, raw: Path, root: Path) -> Any:
    """The real reader of `mdpd_vl.data.prep` on the files `WRITERS[task]` wrote into `raw`.
    `name="shapes"` marks the data as not the official release (no official-size check)."""
    from mdpd_vl.data.prep import gqa, karpathy, msrvtt, msvd, refcoco, vqav2

    out = root / TASK_DIRS[task]
    common: dict[str, Any] = {"force": True, "name": "shapes", "workers": 1}
    if task == "itr":
        return karpathy.prepare(raw, out, dataset="coco", annotations="dataset_shapes.json", image_root=".",
                                **common)
    if task in ("vqa", "gqa"):
        return (vqav2 if task == "vqa" else gqa).prepare(raw, out, min_count=1, **common)
    if task == "refcoco":
        return refcoco.prepare(raw, out, variant="refcoco", split_by="unc", **common)
    return (msrvtt if task == "msrvtt" else msvd).prepare(raw, out, **common)


# ------------------------------------------------------------------------------------- build
def _stored(root: Path, scale: str, seed: int) -> ShapesReport | None:
    """The build report in `root` when it is of this scale, seed and version (else None)."""
    try:
        data = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or (data.get("scale"), data.get("seed"), data.get("version")) != (
            scale, seed, GENERATOR_VERSION):
        return None
    known = set(ShapesReport.__dataclass_fields__)
    report = ShapesReport(**{k: v for k, v in data.items() if k in known})
    if "tasks" not in data:  # written before per-task builds: every task was built at once
        report.tasks = list(TASK_DIRS)
    # a task counts as built only while its indexes are there and its generator is this one
    report.tasks = [t for t in report.tasks if t in TASK_DIRS and any((root / TASK_DIRS[t]).glob("*.index.json"))
                    and report.task_versions.get(t, 1) == TASK_VERSIONS.get(t, 1)]
    return report


def _current(root: Path, scale: str, seed: int, tasks: list[str] | None = None) -> ShapesReport | None:
    """The stored report when `root` holds complete builds of `tasks` (default: all) at this scale and seed."""
    report = _stored(root, scale, seed)
    if report is None or not set(tasks or TASK_DIRS) <= set(report.tasks):
        return None
    return report


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    """The tasks to build (default: all), each known, and each one's optional packages installed.

    Checked before anything is written, so a missing package leaves nothing on disk."""
    names = list(TASK_DIRS) if tasks is None else list(dict.fromkeys(tasks))
    for task in names:
        if task not in TASK_DIRS:
            raise UserError(f"unknown task {task!r}; valid: {', '.join(TASK_DIRS)}", field="tasks")
    for task in names:
        if task in REQUIRES and importlib.util.find_spec(REQUIRES[task][0]) is None:
            module, what, extra = REQUIRES[task]
            raise UserError(f"the shapes {what} of {task} are written with the optional package {module!r}, "
                            f"which is not installed: pip install -e \".[{extra}]\" (or pip install "
                            f"\"mdpd_vl[{extra}]\")", field="tasks")
    return names


def _partials(root: Path | str, *_: Any, **__: Any) -> list[Path]:
    raw = Path(root) / RAW_DIR
    return [raw / f"{t}.partial" for t in TASK_DIRS]


@guard_writes(_partials)  # full disk: one line, no partial left
def build_shapes(root: Path | str, scale: str = "default", seed: int = 0, *, force: bool = False,
                 progress: bool = True, tasks: Sequence[str] | None = None) -> ShapesReport:
    """Generate the world into `root`: raw originals under `root/raw/<task>/` and the indexes in
    `root/<TASK_DIRS[task]>/`, for `tasks` (default: all). Tasks already built at this scale and
    seed are kept (a no-op when all are), unless `force`."""
    root = Path(root)
    if scale not in SCALES:
        raise UserError(f"unknown scale {scale!r}; valid: {', '.join(SCALES)}", field="scale")
    wanted = check_tasks(tasks)
    stored = _stored(root, scale, seed)
    built = [] if force or stored is None else stored.tasks
    todo = [t for t in wanted if t not in built]
    if not todo:
        assert stored is not None
        stored.up_to_date = True
        print(f"shapes world ({scale}, seed {seed}; {', '.join(wanted)}) is up to date in {root} (--force rebuilds)")
        return stored
    raw = root / RAW_DIR
    if raw.exists() and not (raw / STAMP).is_file():  # never overwrite somebody's real data
        raise UserError("exists and was not written by data_prep/shapes.py; choose another --out",
                        where=str(raw))
    t0 = time.perf_counter()
    report = ShapesReport(root=str(root.resolve()), scale=scale, seed=seed, task_dirs=dict(TASK_DIRS))
    if stored is not None:  # keep what the other tasks built (their folders stay valid)
        report.counts, report.ambiguous, report.seconds = stored.counts, stored.ambiguous, stored.seconds
        report.task_versions = {t: v for t, v in stored.task_versions.items() if t in stored.tasks}
        report.tasks = [t for t in stored.tasks if t not in todo]
    raw.mkdir(parents=True, exist_ok=True)
    write_text(raw / STAMP, f"mdpd_vl synthetic shapes world v{GENERATOR_VERSION}, scale {scale}, seed {seed}\n")
    from tqdm import tqdm

    bar = tqdm(total=2 * len(todo), desc="shapes world", unit="step", disable=not progress, file=sys.stderr)
    for task in todo:
        _build_task(task, raw, root, SCALES[scale], seed, report, bar)
        report.tasks.append(task)
        report.task_versions[task] = TASK_VERSIONS.get(task, 1)
        report.seconds = round(report.seconds + time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        write_text(root / MARKER, json.dumps(asdict(report), indent=1))  # after each task: finished ones stay
    bar.close()
    print(summary(report))
    return report


def _build_task(task: str, raw: Path, root: Path, sc: Scale, seed: int, report: ShapesReport, bar: Any) -> None:
    """Write `raw/<task>.partial/`, rename it to `raw/<task>/`, then build the task's indexes."""
    partial, final = raw / f"{task}.partial", raw / task
    if partial.exists():
        shutil.rmtree(partial)  # left by a killed build (inside our stamped raw folder)
    partial.mkdir()
    bar.set_postfix_str(f"{task} originals")
    try:
        WRITERS[task](partial, sc, seed, report)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # nothing half-written stays, whatever stopped us
        raise
    bar.update()
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    bar.set_postfix_str(f"{task} index")
    _prepare(task, final, root)
    bar.update()


def summary(report: ShapesReport) -> str:
    """A few lines: where, how much, and the share of ambiguous test captions."""
    lines = [f"shapes world ({report.scale}, seed {report.seed}) in {report.root} ({report.seconds:.1f} s)"]
    for task, counts in report.counts.items():
        lines.append(f"  {task:8s} -> {report.task_dirs.get(task, task)}/: "
                     + ", ".join(f"{k} {v}" for k, v in counts.items()))
    shares = ", ".join(f"{k} {100 * v:.1f}%" for k, v in report.ambiguous.items())
    lines.append(f"  captions that fit more than one scene of their split: {shares}")
    return "\n".join(lines)


def ensure_shapes(root: Path | str, scale: str = "default", seed: int = 0,
                  tasks: Sequence[str] | None = None) -> Path:
    """The shapes world of `tasks` (default: all) in `root`, built first (with a progress bar) where
    absent; returns `root`. A recipe passes its own task: ITR builds images and captions only.
    Several processes: the main one builds, the others wait and then read it."""
    root = Path(root)
    wanted = check_tasks(tasks)
    with dist.main_first():
        if _current(root, scale, seed, wanted) is None:
            if not dist.is_main():
                raise UserError("the main process built the shapes world here, but this process does not see it: "
                                "the data root must be on a filesystem every process reads", where=str(root))
            print(f"building the synthetic shapes world ({scale}, seed {seed}; {', '.join(wanted)}) in {root} ...",
                  file=sys.stderr)
            build_shapes(root, scale, seed, progress=True, tasks=wanted)
    return root
