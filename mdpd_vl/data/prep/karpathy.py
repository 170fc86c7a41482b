"""Flickr30K and COCO: the Karpathy split JSON, or the VSE-infinity / SCAN `precomp` layout.

Karpathy layout (`--raw DIR`): `DIR/dataset_{flickr30k,coco}.json` (also looked for under
`annotations/` and `caption_datasets/`); Flickr images in `DIR/flickr30k-images/` (or `images/`),
COCO images at `DIR/[images/]<filepath>/<filename>` (`train2014/`, `val2014/`). `restval` is folded
into `train`; COCO images with more than 5 captions keep all of them. Splits: train, val, test.

Precomp layout (VSE-infinity `data/{f30k,coco}`): `DIR/precomp/{split}_caps.txt` (one caption a
line, 5 consecutive lines per image), `{split}_ids.txt` (one id a line: one per image, `im_div` 5, or
one per caption, `im_div` 1), `DIR/id_mapping.json` (`{"id": "relative/image/path"}`) with images in
`DIR/flickr30k-images/` or `DIR/images/`; or `{split}_ims.npy` region features (N x 36 x 2048), which
give `kind: image_region` items (`feature_file`, `row`). Splits as distributed: train, dev (truncated
to its first 5,000 captions, as VSE-infinity does), test, and for COCO testall (5K; test is its first 1K).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mdpd_vl.data.prep.common import (
    DatasetInfo,
    PrepReport,
    PrepRun,
    SplitIndex,
    choose,
    expect,
    find_input,
    first_dir,
    parse_options,
    read_json,
    read_text,
)
from mdpd_vl.data.prep.media import check_features, check_image
from mdpd_vl.errors import UserError

CODE_VERSION = 1
_KARPATHY = "https://cs.stanford.edu/people/karpathy/deepimagesent/ (caption_datasets.zip)"
_FLICKR_IMAGES = "https://shannon.cs.illinois.edu/DenotationGraph/ (flickr30k-images)"
_COCO_IMAGES = "https://cocodataset.org/#download (train2014.zip, val2014.zip)"
_PRECOMP = ("https://github.com/woodfrog/vse_infty (README: data/{f30k,coco} with precomp/ and id_mapping.json)",
            "https://github.com/kuanghuei/SCAN (precomputed region features *_ims.npy)")

INFO = {
    "flickr30k": DatasetInfo("flickr30k", {"train": 29000, "val": 1014, "test": 1000}, "images",
                             (_KARPATHY, _FLICKR_IMAGES)),
    "coco": DatasetInfo("coco", {"train": 113287, "val": 5000, "test": 5000}, "images", (_KARPATHY, _COCO_IMAGES)),
}
PRECOMP_INFO = {
    "flickr30k": DatasetInfo("flickr30k", {"train": 29000, "dev": 1000, "test": 1000}, "images",
                             (*_PRECOMP, _FLICKR_IMAGES)),
    "coco": DatasetInfo("coco", {"train": 113287, "dev": 1000, "test": 1000, "testall": 5000}, "images",
                        (*_PRECOMP, _COCO_IMAGES)),
}
IMAGE_DIRS = {"flickr30k": ("flickr30k-images", "images", "."), "coco": ("images", ".")}
SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
DEV_CAPTIONS = 5000
DEFAULTS: dict[str, Any] = {"layout": "auto", "annotations": None, "image_root": None, "features": "auto"}


def prepare_flickr30k(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False,
                      **options: Any) -> PrepReport:
    """Flickr30K (Karpathy JSON or precomp) -> `<out>/<split>.index.json`; see the module docstring."""
    return prepare(raw, out, dataset="flickr30k", force=force, skip_bad=skip_bad, **options)


def prepare_coco(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False,
                 **options: Any) -> PrepReport:
    """COCO (Karpathy JSON or precomp) -> `<out>/<split>.index.json`; see the module docstring."""
    return prepare(raw, out, dataset="coco", force=force, skip_bad=skip_bad, **options)


def prepare(raw: Path, out: Path, *, dataset: str = "flickr30k", force: bool = False, skip_bad: bool = False,
            **options: Any) -> PrepReport:
    """Read `dataset` (flickr30k | coco) from `raw` in either layout (option `layout`: auto |
    karpathy | precomp; `annotations`, `image_root`, `features`: auto | images | regions)."""
    raw = Path(raw)
    dataset = choose(dataset, tuple(INFO), f"{dataset} prep", "dataset")
    opts = parse_options(options, DEFAULTS, f"{dataset} prep")
    if not raw.is_dir():
        raise UserError(f"raw folder not found; {INFO[dataset].where_to_get()}", where=str(raw))
    layout = choose(opts["layout"], ("auto", "karpathy", "precomp"), f"{dataset} prep", "layout")
    choose(opts["features"], ("auto", "images", "regions"), f"{dataset} prep", "features")
    if layout == "auto":
        layout = "karpathy" if _karpathy_json(raw, dataset, opts, required=False) else "precomp"
    if layout == "karpathy":
        return _prepare_karpathy(raw, Path(out), dataset, opts, force, skip_bad)
    return _prepare_precomp(raw, Path(out), dataset, opts, force, skip_bad)


# -------------------------------------------------------------------------------------- Karpathy

def _karpathy_json(raw: Path, dataset: str, opts: dict[str, Any], *, required: bool = True) -> Path | None:
    if opts["annotations"] is not None:
        path = raw / Path(opts["annotations"])
        if not path.is_file():
            raise UserError(f"not found; {INFO[dataset].where_to_get()}", where=str(path), field="annotations")
        return path
    return find_input(raw, [f"dataset_{dataset}.json"], INFO[dataset], ("", "annotations", "caption_datasets"),
                      required=required)


def _prepare_karpathy(raw: Path, out: Path, dataset: str, opts: dict[str, Any], force: bool,
                      skip_bad: bool) -> PrepReport:
    info = INFO[dataset]
    ann = _karpathy_json(raw, dataset, opts)
    assert ann is not None
    # The exact image root is decided after reading the JSON; every candidate goes into the fingerprint.
    candidates = [raw / c for c in ((opts["image_root"],) if opts["image_root"] else IMAGE_DIRS[dataset])]
    run = PrepRun.start(info, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=[ann], media_dirs=[c for c in candidates if c.is_dir()])
    if run.report.up_to_date:
        return run.report
    data = read_json(ann, info)
    expect(isinstance(data, dict) and isinstance(data.get("images"), list),
           "expected a Karpathy split JSON: {'images': [...], 'dataset': ...}", ann, "images")
    if isinstance(data.get("dataset"), str) and data["dataset"] in INFO and data["dataset"] != dataset:
        raise UserError(f"is the {data['dataset']!r} split, not {dataset!r}", where=str(ann), field="dataset")
    image_root = _image_root(raw, dataset, opts, data["images"], info)
    items: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    used: dict[Path, set[str]] = {}
    for i, img in enumerate(data["images"]):
        parsed = _karpathy_item(img, i, ann, run)
        if parsed is not None:
            split, item = parsed
            items[split].append(item)
            used.setdefault(image_root / item["image"], set()).add(split)
    bad = run.verify(used, check_image)
    splits = [SplitIndex(s, "image_text", image_root, [it for it in its if image_root / it["image"] not in bad])
              for s, its in items.items() if its]
    return run.finish(splits)


def _image_root(raw: Path, dataset: str, opts: dict[str, Any], images: list[Any], info: DatasetInfo) -> Path:
    """`image_root` when given; else the first candidate folder under which the first record's
    `filepath` (COCO's `val2014`) exists, or simply the first existing candidate."""
    if opts["image_root"] is not None:
        return first_dir(raw, (), opts["image_root"], info, "image")
    first = images[0] if images and isinstance(images[0], dict) else {}
    filepath = first.get("filepath")
    for cand in IMAGE_DIRS[dataset]:
        if filepath and (raw / cand / str(filepath)).is_dir():
            return (raw / cand).resolve()
    return first_dir(raw, IMAGE_DIRS[dataset], None, info, "image")


def _karpathy_item(img: Any, i: int, ann: Path, run: PrepRun) -> tuple[str, dict[str, Any]] | None:
    """One Karpathy image record -> (split, item), or None after recording why it is bad."""
    if not isinstance(img, dict) or not isinstance(img.get("filename"), str):
        run.bad(ann, f"images[{i}]: no 'filename'")
        return None
    loc = f"images[{i}] ({img['filename']})"
    split = SPLIT_OF.get(img["split"]) if isinstance(img.get("split"), str) else None
    if split is None:
        run.bad(ann, f"{loc}: split {img.get('split')!r} does not exist (valid: {', '.join(SPLIT_OF)})")
        return None
    sents = img.get("sentences")
    if not isinstance(sents, list) or not sents:
        run.bad(ann, f"{loc}: empty caption list", split)
        return None
    raws = [s.get("raw") if isinstance(s, dict) else None for s in sents]
    captions = [r.strip() if isinstance(r, str) else "" for r in raws]
    if not all(captions):
        k = captions.index("")
        what = "is blank" if isinstance(raws[k], str) else f"has no 'raw' text (got {type(raws[k]).__name__})"
        run.bad(ann, f"{loc}: caption {k} {what}", split)
        return None
    filepath = img.get("filepath")
    rel = f"{filepath}/{img['filename']}" if filepath else img["filename"]
    # COCO records carry the COCO id; Flickr ones only the index, which precomp ids also use.
    image_id = img.get("cocoid", img.get("imgid", i))
    return split, {"image": rel, "image_id": image_id, "captions": captions}


# --------------------------------------------------------------------------------------- precomp

def _prepare_precomp(raw: Path, out: Path, dataset: str, opts: dict[str, Any], force: bool,
                     skip_bad: bool) -> PrepReport:
    info = PRECOMP_INFO[dataset]
    pre = raw / "precomp" if (raw / "precomp").is_dir() else raw
    names = [s for s in info.official if (pre / f"{s}_caps.txt").is_file()]
    if not names:
        raise UserError(f"neither dataset_{dataset}.json nor precomp/{{split}}_caps.txt found; "
                        f"{INFO[dataset].where_to_get()} ; precomp: {' ; '.join(_PRECOMP)}", where=str(raw))
    ids_files = {s: find_input(pre, [f"{s}_ids.txt"], info) for s in names}
    npys = {s: pre / f"{s}_ims.npy" for s in names}
    features = opts["features"]
    if features == "auto":
        features = "regions" if all(p.is_file() for p in npys.values()) else "images"
    inputs = [pre / f"{s}_caps.txt" for s in names] + [p for p in ids_files.values() if p]
    media_dirs: list[Path] = []
    id_to_path: dict[str, Any] = {}
    mapping, image_root = None, pre
    if features == "regions":
        inputs += [p for p in npys.values() if p.is_file()]
    else:
        mapping = find_input(raw, ["id_mapping.json"], info, ("", "precomp"))
        image_root = first_dir(raw, IMAGE_DIRS[dataset][:-1], opts["image_root"], info, "image")
        inputs.append(mapping)  # type: ignore[arg-type]
        media_dirs.append(image_root)
    run = PrepRun.start(info, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=inputs, media_dirs=media_dirs)
    if run.report.up_to_date:
        return run.report
    if mapping is not None:
        id_to_path = read_json(mapping, info)
        expect(isinstance(id_to_path, dict), "expected {\"id\": \"image path\"}", mapping)
    splits = []
    for split in names:
        groups = _precomp_groups(pre, split, ids_files[split], run)  # type: ignore[arg-type]
        if mapping is None:
            splits.append(_region_split(pre, split, groups, run))
        else:
            splits.append(_image_split(image_root, mapping, split, groups, id_to_path, run))
    return run.finish(splits)


def _precomp_groups(pre: Path, split: str, ids_path: Path, run: PrepRun) -> tuple[list[tuple[int, int, list[str]]], int]:
    """(row, image id, captions) per image, and the number of rows `{split}_ims.npy` must have."""
    caps_path = pre / f"{split}_caps.txt"
    # one caption a line: a file cut inside its last line would index a cut caption, so it is refused
    captions = [line.strip() for line in read_text(caps_path, whole_lines=True).splitlines()]
    ids = []
    for n, line in enumerate(read_text(ids_path).splitlines(), start=1):
        for x in line.split():
            try:
                ids.append(int(x))
            except ValueError:
                raise UserError(f"expected integer ids, got {x[:40]!r}", where=str(ids_path),
                                field=f"line {n}") from None
    im_div = 1 if len(ids) == len(captions) else 5
    if im_div == 5 and len(captions) != 5 * len(ids):
        raise UserError(f"{len(captions)} captions for {len(ids)} ids; expected one id per caption or one "
                        "per 5 captions", where=str(caps_path))
    n_caps = min(len(captions), DEV_CAPTIONS) if split == "dev" else len(captions)
    groups: list[tuple[int, int, list[str]]] = []
    if im_div == 5:
        groups = [(k, ids[k], captions[5 * k:min(5 * k + 5, n_caps)]) for k in range((n_caps + 4) // 5)]
    else:  # one id per caption: consecutive captions of one image share the id
        for i in range(n_caps):
            if i == 0 or ids[i] != ids[i - 1]:
                groups.append((i, ids[i], []))
            groups[-1][2].append(captions[i])
    good = []
    for row, image_id, caps in groups:
        if not all(caps):
            run.bad(caps_path, f"image {image_id} (row {row}): blank caption line", split)
        else:
            good.append((row, image_id, caps))
    return good, len(ids)


def _region_split(pre: Path, split: str, groups: tuple[list[tuple[int, int, list[str]]], int],
                  run: PrepRun) -> SplitIndex:
    rows, n_rows = groups
    npy = pre / f"{split}_ims.npy"
    bad = run.verify({npy: [split]}, lambda p: check_features(p, n_rows))
    items = [] if bad else [{"feature_file": npy.name, "row": row, "image_id": image_id, "captions": caps}
                            for row, image_id, caps in rows]
    return SplitIndex(split, "image_region", pre, items)


def _image_split(image_root: Path, mapping: Path, split: str, groups: tuple[list[tuple[int, int, list[str]]], int],
                 id_to_path: dict[str, Any], run: PrepRun) -> SplitIndex:
    items, used = [], {}
    for row, image_id, caps in groups[0]:
        rel = id_to_path.get(str(image_id))
        if not isinstance(rel, str):
            run.bad(mapping, f"id {image_id} ({split}_ids.txt, image row {row}) is not in id_mapping.json", split)
            continue
        items.append({"image": rel, "image_id": image_id, "captions": caps})
        used[image_root / rel] = [split]
    bad = run.verify(used, check_image)
    return SplitIndex(split, "image_text", image_root, [it for it in items if image_root / it["image"] not in bad])


def add_arguments(parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """The CLI options of data_prep/flickr30k.py and coco.py; returns the option names."""
    parser.add_argument("--layout", choices=("auto", "karpathy", "precomp"), default="auto")
    parser.add_argument("--annotations", help="Karpathy JSON, relative to --raw (default dataset_<name>.json)")
    parser.add_argument("--image-root", dest="image_root", help="image folder, relative to --raw")
    parser.add_argument("--features", choices=("auto", "images", "regions"), default="auto",
                        help="precomp only: raw images or {split}_ims.npy region features")
    return ("layout", "annotations", "image_root", "features")
