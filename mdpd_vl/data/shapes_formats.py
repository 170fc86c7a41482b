"""The synthetic shapes world, part 5: writing the ORIGINAL dataset formats (spec section 1).

Each writer takes generated scenes and writes files exactly as the real releases lay them out, so
that the `mdpd_vl.data.prep` readers read them like real data. Layout under `<root>/raw/`:

    itr/dataset_shapes.json + itr/images/*.jpg                   Karpathy split JSON
    msrvtt/MSRVTT_data.json, MSRVTT_train.{9k,7k}.csv,
        MSRVTT_JSFUSION_test.csv + msrvtt/videos/all/*.mp4       CLIP4Clip's MSR-VTT
    msvd/raw-captions.pkl, {train,val,test}_list.txt
        + msvd/YouTubeClips/*.mp4                                 CLIP4Clip's MSVD
    vqa/v2_OpenEnded_mscoco_{train,val}2014_questions.json,
        v2_mscoco_{train,val}2014_annotations.json
        + vqa/{train,val}2014/COCO_*.jpg                          VQAv2
    gqa/{train,val,testdev}_balanced_questions.json + gqa/images/  GQA balanced
    refcoco/refcoco/refs(unc).p, refcoco/refcoco/instances.json
        + refcoco/train2014/COCO_train2014_*.jpg                  lichengunc/refer
"""

from __future__ import annotations

import csv
import json
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdpd_vl.data.shapes_qa import Question, annotator_answers
from mdpd_vl.data.shapes_render import (
    VIDEO_FPS,
    jpeg_bytes,
    render_scene,
    shape_box,
    shape_polygon,
    video_frames,
    write_mp4,
)
from mdpd_vl.data.shapes_scenes import SHAPES, Scene, VideoScene

INFO = {"description": "mdpd_vl synthetic shapes world", "url": "synthetic://mdpd_vl/shapes",
        "version": "1.0", "year": 2024, "contributor": "mdpd_vl data_prep/shapes.py",
        "date_created": "2024-01-01"}  # fixed, so that reruns write identical files
LICENSE = [{"id": 1, "name": "CC0 (synthetic data)", "url": "synthetic://mdpd_vl/shapes"}]


def _json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=None, sort_keys=False), encoding="utf-8")


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _raw_form(text: str, k: int) -> str:
    """How people typed captions: capitalised, sometimes with a final period (varies with `k`)."""
    text = text[0].upper() + text[1:]
    return text + " ." if k % 2 else text


def _image(path: Path, scene: Scene, side: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(render_scene(scene, side)))


# ------------------------------------------------------------------------------------- Karpathy
def write_karpathy(root: Path, splits: dict[str, list[tuple[Scene, list[str]]]], side: int) -> Path:
    """`root/dataset_shapes.json` + `root/images/shapes_NNNNNN.jpg`; returns the JSON path."""
    images, sentid = [], 0
    for split in ("train", "val", "test"):
        for scene, captions in splits.get(split, []):
            imgid = len(images)
            name = f"shapes_{imgid:06d}.jpg"
            _image(root / "images" / name, scene, side)
            sents = []
            for k, cap in enumerate(captions):
                sents.append({"tokens": _tokens(cap), "raw": _raw_form(cap, k), "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"filepath": "images", "sentids": [s["sentid"] for s in sents], "filename": name,
                           "imgid": imgid, "split": split, "sentences": sents})
    path = root / "dataset_shapes.json"
    _json(path, {"images": images, "dataset": "shapes"})
    return path


# ------------------------------------------------------------------------------------- MSR-VTT
def write_msrvtt(root: Path, videos: list[tuple[VideoScene, list[str]]], n_test: int) -> None:
    """MSR-VTT as CLIP4Clip gets it: the last `n_test` videos form the JSFUSION test (first caption
    each); all others the 9k train CSV (the 7k CSV is its first ~78%)."""
    vids, sents = [], []
    n = len(videos)
    n_train = n - n_test
    for i, (scene, caps) in enumerate(videos):
        vid = f"video{i}"
        write_mp4(root / "videos" / "all" / f"{vid}.mp4", video_frames(scene))
        split = "train" if i < int(0.9 * n_train) else ("validate" if i < n_train else "test")
        secs = scene.num_frames / VIDEO_FPS
        vids.append({"category": i % 20, "url": f"synthetic://shapes/watch?v=shapes{i:05d}",
                     "video_id": vid, "start time": 0.0, "end time": secs, "split": split, "id": i})
        for cap in caps:
            sents.append({"caption": cap, "video_id": vid, "sen_id": len(sents)})
    _json(root / "MSRVTT_data.json", {"info": INFO, "videos": vids, "sentences": sents})
    train_ids = [f"video{i}" for i in range(n_train)]
    _csv(root / "MSRVTT_train.9k.csv", ["video_id"], [[v] for v in train_ids])
    _csv(root / "MSRVTT_train.7k.csv", ["video_id"], [[v] for v in train_ids[: max(1, round(0.78 * n_train))]])
    rows = [[f"ret{k}", f"msr{i}", f"video{i}", videos[i][1][0]] for k, i in enumerate(range(n_train, n))]
    _csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"], rows)


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------- MSVD
def write_msvd(root: Path, splits: dict[str, list[tuple[VideoScene, list[str]]]], ids: dict[str, list[str]]) -> None:
    """`raw-captions.pkl` (id -> list of token lists), the three split lists (train and val without a
    final newline, like the real ones) and `YouTubeClips/{id}.mp4`."""
    captions: dict[str, list[list[str]]] = {}
    for split in ("train", "val", "test"):
        for vid, (scene, caps) in zip(ids[split], splits[split]):
            write_mp4(root / "YouTubeClips" / f"{vid}.mp4", video_frames(scene))
            captions[vid] = [_tokens(c) for c in caps]
        text = "\n".join(ids[split]) + ("\n" if split == "test" else "")
        (root / f"{split}_list.txt").write_text(text, encoding="utf-8")
    with open(root / "raw-captions.pkl", "wb") as f:
        pickle.dump(captions, f, protocol=2)


# ------------------------------------------------------------------------------------------ VQA
def coco_name(subset: str, image_id: int) -> str:
    return f"COCO_{subset}_{image_id:012d}.jpg"


def write_vqa(root: Path, subsets: dict[str, list[tuple[Scene, int, list[Question]]]], side: int, rng) -> None:
    """Official VQAv2 questions + annotations JSON per subset (train2014, val2014), COCO-named images."""
    for subset, entries in subsets.items():
        qs, anns = [], []
        for scene, image_id, questions in entries:
            _image(root / subset / coco_name(subset, image_id), scene, side)
            for k, q in enumerate(questions):
                qid = image_id * 1000 + k
                qs.append({"image_id": image_id, "question": q.text, "question_id": qid})
                anns.append({"question_type": q.question_type, "multiple_choice_answer": q.answer,
                             "answers": annotator_answers(q, rng), "image_id": image_id,
                             "answer_type": q.answer_type, "question_id": qid})
        _json(root / f"v2_OpenEnded_mscoco_{subset}_questions.json",
              {"info": INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": LICENSE[0],
               "data_subtype": subset, "questions": qs})
        _json(root / f"v2_mscoco_{subset}_annotations.json",
              {"info": INFO, "license": LICENSE[0], "data_subtype": subset, "annotations": anns})


# ------------------------------------------------------------------------------------------ GQA
def write_gqa(root: Path, splits: dict[str, list[tuple[Scene, str, list[Question]]]], side: int, rng) -> None:
    """`{split}_balanced_questions.json` (questionId -> record) + `images/{imageId}.jpg`."""
    qid = 20000000
    for split, entries in splits.items():
        records: dict[str, Any] = {}
        for scene, image_id, questions in entries:
            _image(root / "images" / f"{image_id}.jpg", scene, side)
            for q in questions:
                qid += 1
                obj = {str(k): f"{image_id}{i}" for k, i in enumerate(q.objects)}
                program = [dict(step, argument=re.sub(r"\((\d+)\)", rf"({image_id}\1)", step["argument"]))
                           for step in q.program]
                records[str(qid)] = {
                    "semantic": program,
                    "entailed": [], "equivalent": [str(qid)],
                    "question": q.text, "imageId": image_id,
                    "isBalanced": bool(rng.random() < 0.85),
                    "groups": {"global": q.detailed if q.structural == "query" else None,
                               "local": f"{q.detailed}-{q.answer}"},
                    "answer": q.answer, "fullAnswer": q.full_answer,
                    "semanticStr": " -> ".join(f"{s['operation']}: {s['argument']} {s['dependencies']}"
                                               for s in program),
                    "annotations": {"answer": {}, "question": obj, "fullAnswer": obj},
                    "types": {"detailed": q.detailed, "semantic": q.semantic, "structural": q.structural},
                }
        _json(root / f"{split}_balanced_questions.json", records)


# -------------------------------------------------------------------------------------- RefCOCO
def write_refcoco(root: Path, entries: Sequence[tuple[Scene, int, str, list[tuple[int, list[str]]]]],
                  side: int) -> None:
    """lichengunc/refer layout: `refcoco/refs(unc).p` (a pickled list of refs) and
    `refcoco/instances.json` (COCO style, boxes x, y, w, h) + `train2014/COCO_train2014_*.jpg`.
    `entries` = (scene, image_id, split, [(object index, sentences)])."""
    images, anns, refs = [], [], []
    ann_id, ref_id, sent_id = 1, 0, 0
    for scene, image_id, split, targets in entries:
        name = coco_name("train2014", image_id)
        _image(root / "train2014" / name, scene, side)
        images.append({"license": 1, "file_name": name, "height": side, "width": side, "id": image_id})
        ann_ids = []
        for p in scene.placed:
            x0, y0, x1, y1 = (round(v, 2) for v in shape_box(p.thing, p.cx, p.cy, p.r))
            poly = shape_polygon(p.thing.shape, p.cx, p.cy, p.r) or _circle_polygon(p.cx, p.cy, p.r)
            anns.append({"segmentation": [[round(v, 2) for xy in poly for v in xy]],
                         "area": round((x1 - x0) * (y1 - y0), 2), "iscrowd": 0, "image_id": image_id,
                         "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                         "category_id": SHAPES.index(p.thing.shape) + 1, "id": ann_id})
            ann_ids.append(ann_id)
            ann_id += 1
        for obj, sentences in targets:
            sents = []
            for s in sentences:
                sents.append({"tokens": _tokens(s), "raw": s[0].upper() + s[1:], "sent_id": sent_id, "sent": s})
                sent_id += 1
            refs.append({"sent_ids": [x["sent_id"] for x in sents], "file_name": name[:-4] + f"_{ann_ids[obj]}.jpg",
                         "ann_id": ann_ids[obj], "ref_id": ref_id, "image_id": image_id, "split": split,
                         "sentences": sents, "category_id": SHAPES.index(scene.placed[obj].thing.shape) + 1})
            ref_id += 1
    cats = [{"supercategory": "shape", "id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    _json(root / "refcoco" / "instances.json",
          {"info": INFO, "licenses": LICENSE, "images": images, "annotations": anns, "categories": cats})
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)


def _circle_polygon(cx: float, cy: float, r: float, n: int = 16) -> list[tuple[float, float]]:
    import math

    return [(cx + r * math.cos(2 * math.pi * k / n), cy + r * math.sin(2 * math.pi * k / n)) for k in range(n)]
