"""RefCOCO, RefCOCO+ and RefCOCOg: lichengunc/refer's `refs(<split_by>).p` + `instances.json`, or MDETR's
`finetune_<variant>_<split>.json`.

Layout (`--raw DIR`, refer's `data/` folder): `DIR/<variant>/refs(<split_by>).p` and
`DIR/<variant>/instances.json` (or both directly in `DIR/`); MDETR files in `DIR/`,
`DIR/mdetr_annotations/` or `DIR/<variant>/`. Images: COCO **train2014** for every split, in
`DIR/train2014/`, `DIR/images/train2014/`, `DIR/images/mscoco/images/train2014/` or `--image-dir`.

One index item per referring expression; the box `[x, y, w, h]` of `instances.json` (absolute pixels)
becomes `bbox_xyxy = [x, y, x + w, y + h]`. MDETR files carry no ref id: `ref_id` is null there and
`sent_id` is MDETR's per-expression image id.

`refs(*).p` is a pickle, and unpickling runs whatever code the file names: it must come from a trusted
source (the refer release). It is read only from the raw folder you name.
"""

from __future__ import annotations

import math
import pickle
import re
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
)
from mdpd_vl.data.prep.media import check_image
from mdpd_vl.errors import UserError

CODE_VERSION = 1
VARIANTS = {"refcoco": ("unc", "google"), "refcoco+": ("unc",), "refcocog": ("umd", "google")}
SPLITS = {"unc": ("train", "val", "testA", "testB"), "umd": ("train", "val", "test"),
          "google": ("train", "val", "test")}
MDETR_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
# Expressions per split of the official releases (refer / MDETR papers).
OFFICIAL = {
    ("refcoco", "unc"): {"train": 120624, "val": 10834, "testA": 5657, "testB": 5095},
    ("refcoco+", "unc"): {"train": 120191, "val": 10758, "testA": 5726, "testB": 4889},
    ("refcocog", "umd"): {"train": 80512, "val": 4896, "test": 9602},
    ("refcocog", "google"): {"train": 85474, "val": 9536},
}
URLS = ("https://github.com/lichengunc/refer (README: refcoco.zip, refcoco+.zip, refcocog.zip)",
         "https://zenodo.org/record/4729015 (MDETR mdetr_annotations.tar.gz)",
         "http://images.cocodataset.org/zips/train2014.zip (images)")
IMAGE_DIRS = ("train2014", "images/train2014", "images/mscoco/images/train2014", "coco/train2014")
DEFAULTS: dict[str, Any] = {"variant": "refcoco", "split_by": None, "source": "auto", "image_dir": None}


def prepare(raw: Path, out: Path, *, force: bool = False, skip_bad: bool = False, **options: Any) -> PrepReport:
    """RefCOCO/+/g originals in `raw` -> `<out>/<split>.index.json` (kind grounding). Options: `variant`
    refcoco | refcoco+ | refcocog, `split_by` unc | umd | google (default unc, umd for refcocog),
    `source` auto | refer | mdetr, `image_dir`."""
    raw, out = Path(raw), Path(out)
    opts = parse_options(options, DEFAULTS, "refcoco prep")
    variant = choose(opts["variant"], tuple(VARIANTS), "refcoco prep", "variant")
    split_by = choose(opts["split_by"] or VARIANTS[variant][0], VARIANTS[variant], f"{variant} prep", "split_by")
    source = choose(opts["source"], ("auto", "refer", "mdetr"), f"{variant} prep", "source")
    info = DatasetInfo(variant, OFFICIAL.get((variant, split_by), {}), "expressions", URLS)
    if not raw.is_dir():
        raise UserError(f"raw folder not found; {info.where_to_get()}", where=str(raw))
    pkl = find_input(raw, [f"refs({split_by}).p"], info, (variant, ""), required=source == "refer")
    mdetr = _mdetr_files(raw, variant)
    if source == "auto":
        source = "refer" if pkl else "mdetr" if mdetr else ""
        if not source:
            raise UserError(f"neither {variant}/refs({split_by}).p nor finetune_{variant}_<split>.json found; "
                            f"{info.where_to_get()}", where=str(raw))
    if source == "mdetr":
        if not mdetr:
            raise UserError(f"no finetune_{variant}_<split>.json found; {info.where_to_get()}", where=str(raw))
        if split_by != MDETR_SPLIT_BY[variant]:
            raise UserError(f"MDETR's files use the {MDETR_SPLIT_BY[variant]} split of {variant}",
                            where=str(raw), field="split_by")
        inputs = list(mdetr.values())
    else:
        assert pkl is not None
        instances = find_input(pkl.parent, ["instances.json"], info)
        inputs = [pkl, instances]  # type: ignore[list-item]
    image_dir = first_dir(raw, IMAGE_DIRS, opts["image_dir"], info, "train2014 image")
    run = PrepRun.start(info, raw, out, opts, force=force, skip_bad=skip_bad, code_version=CODE_VERSION,
                        inputs=inputs, media_dirs=[image_dir])
    if run.report.up_to_date:
        return run.report
    if source == "mdetr":
        items = _read_mdetr(mdetr, SPLITS[split_by], info, run)
    else:
        items = _read_refer(pkl, instances, SPLITS[split_by], info, run)  # type: ignore[arg-type]
    used: dict[Path, set[str]] = {}
    for split, its in items.items():
        for it in its:
            used.setdefault(image_dir / it["image"], set()).add(split)
    bad = run.verify(used, check_image)
    return run.finish([SplitIndex(s, "grounding", image_dir, [it for it in its if image_dir / it["image"] not in bad])
                       for s, its in items.items()])


def _mdetr_files(raw: Path, variant: str) -> dict[str, Path]:
    pattern = re.compile(rf"finetune_{re.escape(variant)}_(\w+)\.json$")
    found: dict[str, Path] = {}
    for sub in ("", "mdetr_annotations", variant):
        folder = raw / sub
        for path in sorted(folder.glob(f"finetune_{variant}_*.json")) if folder.is_dir() else []:
            match = pattern.match(path.name)
            if match:
                found.setdefault(match.group(1), path)
    return found


def load_refs(pkl: Path, info: DatasetInfo) -> list[Any]:
    """The refs list of `refs(<split_by>).p`. The pickle must come from a trusted source: unpickling
    can run code; it is read only from the user's raw folder."""
    try:
        with open(pkl, "rb") as f:
            try:
                refs = pickle.load(f)  # trusted file from the user's own raw folder (see module docstring)
            except UnicodeDecodeError:  # Python 2 pickles with non-ASCII bytes
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
    except OSError as err:
        raise UserError(f"cannot read ({err.strerror or type(err).__name__})", where=str(pkl)) from None
    except Exception as err:  # a cut or corrupt pickle fails in many ways (EOFError, KeyError, ...)
        raise UserError(f"not a readable pickle ({type(err).__name__}: {err}); the file looks truncated or "
                        f"corrupt; {info.where_to_get()}", where=str(pkl)) from None
    expect(isinstance(refs, list), f"expected a list of refs, got {type(refs).__name__}", pkl)
    return refs


def xywh_to_xyxy(bbox: Any) -> list[float] | None:
    """COCO `[x, y, w, h]` -> `[x1, y1, x2, y2]` in the same pixels; None unless w, h > 0 and finite."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        return None
    return [x, y, x + w, y + h]


def _key(value: Any) -> Any:
    """`value` when it can be a dict key of an id (str/int), else None (a list id matches nothing)."""
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _size(img: dict[str, Any]) -> str | None:
    """Why the image's width/height are unusable (absent is fine), else None."""
    for key in ("width", "height"):
        v = img.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            return f"image {img.get('id')} has {key} {v!r}, expected a positive number"
    return None


def _strip_ann_id(name: Any) -> str | None:
    """refer's `COCO_train2014_000000581857_16.jpg` (image + ann id) -> the COCO file name."""
    if not isinstance(name, str) or name.count("_") < 3:
        return None
    return name.rsplit("_", 1)[0] + ".jpg"


def _read_refer(pkl: Path, instances: Path, splits: tuple[str, ...], info: DatasetInfo,
                run: PrepRun) -> dict[str, list[dict[str, Any]]]:
    refs = load_refs(pkl, info)
    inst = read_json(instances, info)
    expect(isinstance(inst, dict) and isinstance(inst.get("images"), list)
           and isinstance(inst.get("annotations"), list), "expected COCO-style images and annotations",
           instances, "annotations")
    images = {_key(im.get("id")): im for im in inst["images"] if isinstance(im, dict)}
    anns = {_key(a.get("id")): a for a in inst["annotations"] if isinstance(a, dict)}
    images.pop(None, None)
    anns.pop(None, None)
    items: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            run.bad(pkl, f"refs[{k}]: not a dict")
            continue
        loc = f"refs[{k}] (ref_id {ref.get('ref_id')})"
        split = ref.get("split")
        if not isinstance(split, str) or split not in items:
            run.bad(pkl, f"{loc}: split {split!r} does not exist (valid: {', '.join(splits)})")
            continue
        ann, img = anns.get(_key(ref.get("ann_id"))), images.get(_key(ref.get("image_id")))
        box = xywh_to_xyxy(ann.get("bbox")) if ann else None
        if ann is None or img is None:
            what = "ann_id" if ann is None else "image_id"
            run.bad(instances, f"{loc}: {what} {ref.get(what)} is not in instances.json", split)
            continue
        if box is None:
            run.bad(instances, f"{loc}: annotation {ann.get('id')} has no valid bbox [x, y, w, h]", split)
            continue
        file_name = img.get("file_name") or _strip_ann_id(ref.get("file_name"))
        if not isinstance(file_name, str):
            run.bad(instances, f"{loc}: image {img.get('id')} has no file_name", split)
            continue
        if (why := _size(img)) is not None:
            run.bad(instances, f"{loc}: {why}", split)
            continue
        sents = ref.get("sentences")
        if not isinstance(sents, list) or not sents:
            run.bad(pkl, f"{loc}: empty caption list (no sentences)", split)
            continue
        for s in sents:
            text = (s.get("sent") or s.get("raw")) if isinstance(s, dict) else None
            text = text.strip() if isinstance(text, str) else ""
            if not text:
                run.bad(pkl, f"{loc}: sentence {s.get('sent_id') if isinstance(s, dict) else s!r} is blank", split)
                continue
            items[split].append({
                "ref_id": ref.get("ref_id"), "sent_id": s.get("sent_id"), "ann_id": ann.get("id"),
                "image": file_name, "image_id": img.get("id"), "sentence": text,
                "bbox_xyxy": box, "width": img.get("width"), "height": img.get("height")})
    return items


def _read_mdetr(files: dict[str, Path], splits: tuple[str, ...], info: DatasetInfo,
                run: PrepRun) -> dict[str, list[dict[str, Any]]]:
    items: dict[str, list[dict[str, Any]]] = {}
    for split, path in files.items():
        if split not in splits:
            run.bad(path, f"split {split!r} does not exist (valid: {', '.join(splits)})")
            continue
        data = read_json(path, info)
        expect(isinstance(data, dict) and isinstance(data.get("images"), list)
               and isinstance(data.get("annotations"), list), "expected COCO-style images and annotations",
               path, "annotations")
        per_image: dict[Any, list[dict[str, Any]]] = {}
        for a in data["annotations"]:
            if isinstance(a, dict) and _key(a.get("image_id")) is not None:
                per_image.setdefault(a["image_id"], []).append(a)
        items[split] = []
        for k, img in enumerate(data["images"]):
            anns = per_image.get(_key(img.get("id")), []) if isinstance(img, dict) else []
            loc = f"images[{k}]"
            if len(anns) != 1:  # MDETR's evaluator asserts exactly one box per expression
                run.bad(path, f"{loc}: {len(anns)} annotations, expected exactly one", split)
                continue
            caption = img.get("caption")
            box, text = xywh_to_xyxy(anns[0].get("bbox")), caption.strip() if isinstance(caption, str) else ""
            problem = ("no valid bbox" if box is None else "blank caption" if not text
                       else "no file_name" if not isinstance(img.get("file_name"), str) else _size(img))
            if problem:
                run.bad(path, f"{loc}: {problem}", split)
                continue
            items[split].append({
                "ref_id": None, "sent_id": img.get("id"), "ann_id": anns[0].get("original_id", anns[0].get("id")),
                "image": img.get("file_name"), "image_id": img.get("original_id", img.get("id")),
                "sentence": text, "bbox_xyxy": box, "width": img.get("width"), "height": img.get("height")})
    return items
