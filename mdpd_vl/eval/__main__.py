"""`python -m mdpd_vl.eval {itr,vtr,vqa,gqa,grounding} ...`: score prediction files in the official
formats, print a table and (with --out) write the metrics as JSON. See mdpd_vl/eval/README.md."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mdpd_vl.atomic import check_paths
from mdpd_vl.errors import UserError, cli_entry
from mdpd_vl.eval import report as io

BOX_FORMATS = ("xyxy", "xywh", "cxcywh_norm")


def _finite_matrix(path: str) -> Any:
    """`io.load_matrix`, checked here so that a bad matrix is blamed on its own file (not on the
    mapping): 2-D, numbers, and no inf/nan score (a ranking of inf ties is no metric)."""
    import numpy as np

    sims = io.load_matrix(path)
    if sims.ndim != 2:
        raise UserError(f"expected a 2-D similarity matrix, got shape {tuple(sims.shape)}", where=path)
    if not (np.issubdtype(sims.dtype, np.number) and not np.issubdtype(sims.dtype, np.complexfloating)):
        raise UserError(f"expected numbers, got dtype {sims.dtype}", where=path)
    if not np.isfinite(sims).all():
        row, col = (int(v) for v in np.argwhere(~np.isfinite(sims))[0])
        raise UserError(f"holds a non-finite score (first at row {row}, column {col}); write finite "
                        "similarities", where=path)
    return sims


def _threshold(text: str) -> float:
    """An IoU threshold: a finite number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def run_itr(args: argparse.Namespace) -> tuple[dict, str, dict]:
    """Image-text retrieval from a .npy images x captions matrix."""
    from mdpd_vl.eval.retrieval import evaluate_itr

    sims = _finite_matrix(args.sims)
    owner = io.load_mapping(args.mapping, "caption_to_image") if args.mapping else None
    with io.blame(args.mapping or args.sims):
        m = evaluate_itr(sims, owner, captions_per_image=args.captions_per_image, folds=args.folds)
    title = (f"image-text retrieval: {sims.shape[0]} images x {sims.shape[1]} captions"
             + (f", mean of {args.folds} folds" if args.folds > 1 else ""))
    text = io.retrieval_table(m, "i2t", "t2i", title)
    return m, text, {"sims": args.sims, "mapping": args.mapping, "folds": args.folds}


def run_vtr(args: argparse.Namespace) -> tuple[dict, str, dict]:
    """Video-text retrieval from a .npy texts x videos matrix."""
    from mdpd_vl.eval.video_retrieval import evaluate_vtr

    sims = _finite_matrix(args.sims)
    owner = io.load_mapping(args.mapping, "text_to_video") if args.mapping else None
    with io.blame(args.mapping or args.sims):
        m = evaluate_vtr(sims, owner, multi_sentence=args.multi_sentence)
    title = f"video-text retrieval: {sims.shape[0]} texts x {sims.shape[1]} videos"
    text = io.retrieval_table(m, "t2v", "v2t", title)
    return m, text, {"sims": args.sims, "mapping": args.mapping}


def _vqa_annotations(path: str) -> list[Mapping[str, Any]]:
    obj = io.load_json(path)
    if io.is_index(obj):
        items = io.index_items(obj, ("vqa",), path)
        out = []
        for i, it in enumerate(items):
            for key in ("question_id", "raw_answers", "question_type", "answer_type"):
                if key not in it:
                    raise UserError(f"item {i} has no '{key}'", where=path, field=key)
            out.append({"question_id": it["question_id"], "question_type": it["question_type"],
                        "answer_type": it["answer_type"], "answers": it["raw_answers"]})
        return out
    if not isinstance(obj, Mapping) or not isinstance(obj.get("annotations"), list):
        raise UserError("expected the official annotations JSON (an object with an 'annotations' "
                        "list) or a canonical vqa index", where=path, field="annotations")
    return obj["annotations"]


def run_vqa(args: argparse.Namespace) -> tuple[dict, str, dict]:
    """Official VQA accuracy of a results file `[{question_id, answer}]`."""
    from mdpd_vl.eval.vqa import vqa_accuracy

    anns = _vqa_annotations(args.annotations)
    recs = io.records(io.load_json(args.results), ("question_id", "answer"), args.results)
    preds = io.unique_map(recs, "question_id", "answer", args.results)
    with io.blame(args.annotations, predictions=args.results):
        m = vqa_accuracy(preds, anns)
    rows = [["overall", m["overall"], m["num_questions"]]]
    rows += [[f"  {k}", v, ""] for k, v in sorted(m["per_answer_type"].items())]
    text = io.table(["answer type", "accuracy", "questions"], rows, "VQA accuracy (official)")
    return m, text, {"results": args.results, "annotations": args.annotations}


def run_gqa(args: argparse.Namespace) -> tuple[dict, str, dict]:
    """Official GQA accuracy of a predictions file `[{questionId, prediction}]`."""
    from mdpd_vl.eval.gqa import gqa_accuracy, questions_from_index

    obj = io.load_json(args.questions)
    if io.is_index(obj):
        with io.blame(args.questions):
            questions = questions_from_index(io.index_items(obj, ("gqa",), args.questions))
    elif isinstance(obj, Mapping):
        questions = obj
    else:
        raise UserError("expected the balanced questions JSON (questionId -> record) or a canonical "
                        "gqa index", where=args.questions)
    recs = io.records(io.load_json(args.predictions), ("questionId", "prediction"), args.predictions)
    preds = io.unique_map(recs, "questionId", "prediction", args.predictions)
    with io.blame(args.questions, predictions=args.predictions):
        m = gqa_accuracy(preds, questions)
    rows = [[k, m[k]] for k in ("accuracy", "binary", "open")]
    rows += [[f"  {k}", v] for k, v in m["per_structural"].items()]
    text = io.table(["metric", "percent"], rows, f"GQA accuracy (balanced, {m['num_questions']} q)")
    return m, text, {"predictions": args.predictions, "questions": args.questions}


def _gt_from_coco(obj: Mapping[str, Any], path: str, split: str | None) -> dict[Any, dict]:
    """MDETR refexp file: one image per expression, exactly one annotation each."""
    from mdpd_vl.eval.grounding import xywh_to_xyxy

    stem = Path(path).name.removesuffix(".json")
    match = re.fullmatch(r"finetune_(refcoco|refcoco\+|refcocog)_(\w+)", stem)
    split = split or (match.group(2) if match else stem)
    images = {img.get("id"): img for img in obj["images"] if isinstance(img, Mapping)}
    anns: dict[Any, list] = {}
    for i, ann in enumerate(obj["annotations"]):
        if not isinstance(ann, Mapping) or "image_id" not in ann or "bbox" not in ann:
            raise UserError(f"annotation {i} needs 'image_id' and 'bbox'", where=path, field="annotations")
        anns.setdefault(ann["image_id"], []).append(ann)
    gt = {}
    for img_id, img in images.items():
        found = anns.get(img_id, [])
        if len(found) != 1:
            raise UserError(f"image {img_id} has {len(found)} annotations; a refexp file has exactly "
                            "one per expression", where=path, field="annotations")
        with io.blame(path):
            box = xywh_to_xyxy(found[0]["bbox"], f"annotation of image {img_id}: bbox")[0]
        name = img.get("dataset_name") or (match.group(1) if match else "refexp")
        gt[img_id] = {"box": box, "group": f"{name}/{split}", "width": img.get("width"),
                      "height": img.get("height")}
    return gt


def _gt_from_index(obj: Mapping[str, Any], path: str) -> dict[Any, dict]:
    from mdpd_vl.eval.grounding import check_xyxy

    gt = {}
    group = f"{obj.get('dataset', 'refexp')}/{obj.get('split', Path(path).stem)}"
    for i, it in enumerate(io.index_items(obj, ("grounding",), path)):
        for key in ("sent_id", "bbox_xyxy", "width", "height"):
            if key not in it:
                raise UserError(f"item {i} has no '{key}'", where=path, field=key)
        with io.blame(path):
            box = check_xyxy(it["bbox_xyxy"], f"item {i}: bbox_xyxy")[0]
        gt[it["sent_id"]] = {"box": box, "group": group, "width": it["width"], "height": it["height"]}
    return gt


def _to_pixels(boxes: Any, fmt: str, gt: Mapping[str, Any], where: str) -> Any:
    from mdpd_vl.eval.grounding import check_xyxy, cxcywh_norm_to_xyxy, xywh_to_xyxy

    if fmt == "xywh":
        return xywh_to_xyxy(boxes, where)
    if fmt == "cxcywh_norm":
        if gt["width"] is None or gt["height"] is None:
            raise UserError("the ground truth has no width/height to scale normalised boxes", where=where)
        return cxcywh_norm_to_xyxy(boxes, gt["width"], gt["height"], where)
    return check_xyxy(boxes, where)


def run_grounding(args: argparse.Namespace) -> tuple[dict, str, dict]:
    """Precision@0.5 (IoU and MDETR's GIoU) per dataset/split, plus P@1/5/10 for ranked boxes."""
    import torch

    from mdpd_vl.eval.grounding import grounding_report, precision_at_k

    obj = io.load_json(args.gt)
    if io.is_index(obj):
        gt, key = _gt_from_index(obj, args.gt), "sent_id"
    elif isinstance(obj, Mapping) and isinstance(obj.get("images"), list) and \
            isinstance(obj.get("annotations"), list):
        gt, key = _gt_from_coco(obj, args.gt, args.split), "image_id"
    else:
        raise UserError("expected an MDETR/COCO-style refexp JSON (images + annotations) or a "
                        "canonical grounding index", where=args.gt)
    recs = io.records(io.load_json(args.predictions), (key,), args.predictions)
    preds = io.unique_map(recs, key, key, args.predictions)  # duplicate check only
    missing = [k for k in gt if k not in preds]
    if missing:
        raise UserError(f"no prediction for {len(missing)} of {len(gt)} expressions (e.g. {key} "
                        f"{missing[0]})", where=args.predictions, field=key)
    by_id = {r[key]: r for r in recs}
    top1, ranked, scores, gts, groups = [], [], [], [], []
    for k, g in gt.items():
        rec, where = by_id[k], f"{args.predictions}: {key} {k}"
        if "boxes" in rec and "scores" in rec:
            boxes = _to_pixels(rec["boxes"], args.box_format, g, where)
            sc = torch.as_tensor(rec["scores"], dtype=torch.float64).reshape(-1)
            if len(sc) != len(boxes) or len(sc) == 0:
                raise UserError(f"{len(boxes)} boxes but {len(sc)} scores", where=where, field="scores")
            ranked.append(boxes)
            scores.append(sc)
            top1.append(boxes[int(torch.argmax(sc))])
        elif "bbox" in rec:
            top1.append(_to_pixels(rec["bbox"], args.box_format, g, where)[0])
        else:
            raise UserError("needs 'bbox' or 'boxes' + 'scores'", where=where, field="bbox")
        gts.append(g["box"])
        groups.append(g["group"])
    with io.blame(args.predictions):
        m: dict[str, Any] = {"per_split": grounding_report(torch.stack(top1), torch.stack(gts), groups,
                                                           threshold=args.threshold)}
        if len(ranked) == len(gts):
            m["mdetr_precision_at_k"] = {
                name: precision_at_k([b for b, n in zip(ranked, groups) if n == name],
                                     [s for s, n in zip(scores, groups) if n == name],
                                     torch.stack([g for g, n in zip(gts, groups) if n == name]),
                                     threshold=args.threshold, kind="giou")
                for name in m["per_split"]}
    rows = [[name, r["precision_iou"], r["precision_giou"], r["miou"], r["count"]]
            for name, r in m["per_split"].items()]
    text = io.table(["split", f"P@{args.threshold:g} IoU", f"P@{args.threshold:g} GIoU", "mIoU", "n"],
                    rows, "referring expression grounding")
    return m, text, {"predictions": args.predictions, "gt": args.gt, "box_format": args.box_format}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m mdpd_vl.eval`."""
    p = argparse.ArgumentParser(prog="python -m mdpd_vl.eval", description=__doc__)
    sub = p.add_subparsers(dest="task", required=True)
    itr = sub.add_parser("itr", help="image-text retrieval (VSE-infinity protocol)")
    itr.add_argument("sims", help="images x captions similarity matrix (.npy)")
    itr.add_argument("--mapping", help="image of every caption: .npy/.txt/.json list or a canonical index")
    itr.add_argument("--captions-per-image", type=int, default=5)
    itr.add_argument("--folds", type=int, default=1, help="5 = COCO 1K (mean over 5 folds)")
    itr.set_defaults(run=run_itr)
    vtr = sub.add_parser("vtr", help="video-text retrieval (CLIP4Clip protocol)")
    vtr.add_argument("sims", help="texts x videos similarity matrix (.npy)")
    vtr.add_argument("--mapping", help="video of every text: .npy/.txt/.json list or a canonical index")
    ms = vtr.add_mutually_exclusive_group()
    ms.add_argument("--multi-sentence", dest="multi_sentence", action="store_true", default=None)
    ms.add_argument("--single-sentence", dest="multi_sentence", action="store_false")
    vtr.set_defaults(run=run_vtr)
    vqa = sub.add_parser("vqa", help="official VQA accuracy")
    vqa.add_argument("results", help="results JSON [{question_id, answer}]")
    vqa.add_argument("annotations", help="official annotations JSON or a canonical vqa index")
    vqa.set_defaults(run=run_vqa)
    gqa = sub.add_parser("gqa", help="official GQA accuracy (balanced questions)")
    gqa.add_argument("predictions", help="predictions JSON [{questionId, prediction}]")
    gqa.add_argument("questions", help="balanced questions JSON or a canonical gqa index")
    gqa.set_defaults(run=run_gqa)
    gr = sub.add_parser("grounding", help="RefCOCO/+/g precision@0.5")
    gr.add_argument("predictions", help="JSON [{image_id|sent_id, bbox | boxes+scores}]")
    gr.add_argument("gt", help="MDETR finetune_<dataset>_<split>.json or a canonical grounding index")
    gr.add_argument("--box-format", choices=BOX_FORMATS, default="xyxy",
                    help="predicted box format (cxcywh_norm = MDETR's raw normalised output)")
    gr.add_argument("--split", help="split label for an MDETR file (default: from its name)")
    gr.add_argument("--threshold", type=_threshold, default=0.5, help="IoU threshold in (0, 1]")
    gr.set_defaults(run=run_grounding)
    for s in (itr, vtr, vqa, gqa, gr):
        s.add_argument("--out", help="write the metrics JSON here")
    return p


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, score, print the table, write --out."""
    args = build_parser().parse_args(argv)
    check_paths(out_files={"--out": args.out})  # before any scoring: a bad --out fails at once
    if args.out and not Path(args.out).expanduser().parent.is_dir():
        raise UserError("the output folder does not exist", where=str(Path(args.out).parent), field="--out")
    metrics, text, inputs = args.run(args)
    print(text)
    if args.out:
        io.write_result(args.out, args.task, inputs, metrics)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
