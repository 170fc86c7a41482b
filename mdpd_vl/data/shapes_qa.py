"""The synthetic shapes world, part 4: questions. VQA questions with ten annotators and GQA records.

Questions are asked about `free` scenes. Yes/no questions are drawn balanced (the truth value is
drawn first). VQA annotators sometimes disagree (a neighbouring colour, a count off by one, a
flipped yes/no) and sometimes write the right answer differently ("Two", "red."), which is what
the official normalisation exists for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mdpd_vl.data.shapes_scenes import COLOURS, SHAPES, Placed, Scene
from mdpd_vl.data.shapes_text import article

NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass
class Question:
    """One question about a scene with its correct answer and the VQA / GQA type labels."""

    text: str
    answer: str
    answer_type: str  # VQA: yes/no | number | other
    question_type: str  # VQA: one of the 65 official prefixes
    kind: str  # colour | shape | count | yesno (how annotators err)
    structural: str = "query"  # GQA types
    semantic: str = "attr"
    detailed: str = "queryAttr"
    full_answer: str = ""
    program: list[dict] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)  # indices into scene.placed that it mentions


def _unique(placed: list[Placed], key) -> list[int]:
    """Indices of things whose `key` no other thing shares."""
    keys = [key(p) for p in placed]
    return [i for i, k in enumerate(keys) if keys.count(k) == 1]


def _left_of(a: Placed, b: Placed, side: int) -> bool:
    return b.cx - a.cx > 0.12 * side and abs(b.cy - a.cy) < (b.cx - a.cx)


def _select(name: str, obj: int | None) -> dict:
    """A GQA program step; `obj` indexes scene.placed (None: the object is not in the scene)."""
    return {"operation": "select", "argument": f"{name} ({'-' if obj is None else obj})",
            "dependencies": []}


def _colour_q(scene, rng, side) -> Question | None:
    idx = _unique(list(scene.placed), lambda p: p.thing.shape)
    if not idx:
        return None
    i = idx[int(rng.integers(len(idx)))]
    t = scene.placed[i].thing
    return Question(f"What color is the {t.shape}?", t.colour, "other", "what color is the", "colour",
                    "query", "attr", "queryAttr", f"The {t.shape} is {t.colour}.",
                    [_select(t.shape, i), {"operation": "query", "argument": "color", "dependencies": [0]}],
                    [i])


def _shape_q(scene, rng, side) -> Question | None:
    idx = _unique(list(scene.placed), lambda p: p.thing.colour)
    if not idx:
        return None
    i = idx[int(rng.integers(len(idx)))]
    t = scene.placed[i].thing
    return Question(f"What shape is the {t.colour} object?", t.shape, "other", "what", "shape",
                    "query", "cat", "queryObject", f"The {t.colour} object is a {t.shape}.",
                    [_select(f"{t.colour} object", i), {"operation": "query", "argument": "name",
                                                        "dependencies": [0]}], [i])


def _count_q(scene, rng, side) -> Question | None:
    things = [p.thing for p in scene.placed]
    which = int(rng.integers(3))
    if which == 0:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        n, text = sum(t.shape == shape for t in things), f"How many {shape}s are there?"
    elif which == 1:
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        n, text = sum(t.colour == colour for t in things), f"How many {colour} objects are there?"
    else:
        n, text = len(things), "How many shapes are in the picture?"
    return Question(text, str(n), "number", "how many", "count", "query", "obj", "count")


def _exist_q(scene, rng, side) -> Question | None:
    things = [p.thing for p in scene.placed]
    want = bool(rng.random() < 0.5)
    if want:
        i = int(rng.integers(len(things)))
        colour, shape, objs = things[i].colour, things[i].shape, [i]
    else:  # a near miss: a shape that is there, in a colour it does not have
        shape = things[int(rng.integers(len(things)))].shape
        absent = [c for c in COLOURS if all((t.colour, t.shape) != (c, shape) for t in things)]
        colour, objs = absent[int(rng.integers(len(absent)))], []
    ans = "yes" if want else "no"
    full = f"Yes, there is {article(colour)} {colour} {shape}." if want else f"No, there is no {colour} {shape}."
    return Question(f"Is there {article(colour)} {colour} {shape}?", ans, "yes/no", "is there a", "yesno",
                    "verify", "obj", "existAttr", full,
                    [_select(shape, objs[0] if objs else None), {"operation": "filter color",
                     "argument": colour, "dependencies": [0]},
                     {"operation": "exist", "argument": "?", "dependencies": [1]}], objs)


def _relation_q(scene, rng, side) -> Question | None:
    placed = list(scene.placed)
    idx = _unique(placed, lambda p: (p.thing.colour, p.thing.shape))
    pairs = [(a, b) for a in idx for b in idx if _left_of(placed[a], placed[b], side)]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    ta, tb = placed[a].thing, placed[b].thing
    want = bool(rng.random() < 0.5)
    if want:
        text = f"Is the {ta.colour} {ta.shape} to the left of the {tb.colour} {tb.shape}?"
    else:
        text = f"Is the {tb.colour} {tb.shape} to the left of the {ta.colour} {ta.shape}?"
    return Question(text, "yes" if want else "no", "yes/no", "is the", "yesno", "verify", "rel",
                    "verifyRelS", "Yes, it is." if want else "No, it is to the right.",
                    [_select(ta.shape, a), _select(tb.shape, b),
                     {"operation": "verify rel", "argument": "to the left of", "dependencies": [0, 1]}],
                    [a, b])


def _size_q(scene, rng, side) -> Question | None:
    placed = list(scene.placed)
    idx = _unique(placed, lambda p: (p.thing.colour, p.thing.shape))
    if not idx:
        return None
    i = idx[int(rng.integers(len(idx)))]
    t = placed[i].thing
    asked = ("small", "large")[int(rng.integers(2))]
    ans = "yes" if t.size == asked else "no"
    return Question(f"Is the {t.colour} {t.shape} {asked}?", ans, "yes/no", "is the", "yesno",
                    "verify", "attr", "verifyAttr", f"{ans.capitalize()}, the {t.shape} is {t.size}.",
                    [_select(t.shape, i), {"operation": "verify size", "argument": asked,
                                           "dependencies": [0]}], [i])


def _choose_q(scene, rng, side) -> Question | None:
    idx = _unique(list(scene.placed), lambda p: p.thing.shape)
    if not idx:
        return None
    i = idx[int(rng.integers(len(idx)))]
    t = scene.placed[i].thing
    other = [c for c in COLOURS if c != t.colour][int(rng.integers(len(COLOURS) - 1))]
    a, b = (t.colour, other) if rng.random() < 0.5 else (other, t.colour)
    return Question(f"Is the {t.shape} {a} or {b}?", t.colour, "other", "is the", "colour",
                    "choose", "attr", "chooseAttr", f"The {t.shape} is {t.colour}.",
                    [_select(t.shape, i), {"operation": "choose color", "argument": f"{a}|{b}",
                                           "dependencies": [0]}], [i])


def _logic_q(scene, rng, side) -> Question | None:
    shapes = {p.thing.shape for p in scene.placed}
    s1 = SHAPES[int(rng.integers(len(SHAPES)))]
    s2 = [s for s in SHAPES if s != s1][int(rng.integers(len(SHAPES) - 1))]
    ans = "yes" if s1 in shapes and s2 in shapes else "no"
    return Question(f"Are there both {article(s1)} {s1} and {article(s2)} {s2} in the picture?", ans, "yes/no", "are there",
                    "yesno", "logical", "obj", "logicAnd", f"{ans.capitalize()}.",
                    [_select(s1, None), {"operation": "exist", "argument": "?", "dependencies": [0]},
                     _select(s2, None), {"operation": "exist", "argument": "?", "dependencies": [2]},
                     {"operation": "and", "argument": "", "dependencies": [1, 3]}])


def _compare_q(scene, rng, side) -> Question | None:
    idx = _unique(list(scene.placed), lambda p: p.thing.shape)
    if len(idx) < 2:
        return None
    a, b = (int(v) for v in rng.choice(idx, 2, replace=False))
    ta, tb = scene.placed[a].thing, scene.placed[b].thing
    ans = "yes" if ta.colour == tb.colour else "no"
    return Question(f"Are the {ta.shape} and the {tb.shape} the same color?", ans, "yes/no", "are the",
                    "yesno", "compare", "attr", "sameColor", f"{ans.capitalize()}.",
                    [_select(ta.shape, a), _select(tb.shape, b),
                     {"operation": "same color", "argument": "", "dependencies": [0, 1]}], [a, b])


VQA_KINDS = (_colour_q, _shape_q, _count_q, _exist_q, _relation_q, _size_q)
GQA_KINDS = (_colour_q, _shape_q, _exist_q, _relation_q, _choose_q, _logic_q, _compare_q)


def questions(scene: Scene, rng: np.random.Generator, side: int, k: int, gqa: bool = False) -> list[Question]:
    """Up to `k` distinct questions about `scene` (VQA kinds, or GQA kinds with GQA type labels)."""
    kinds = GQA_KINDS if gqa else VQA_KINDS
    out: list[Question] = []
    for j in rng.permutation(len(kinds) * 2) % len(kinds):
        q = kinds[j](scene, rng, side)
        if q is not None and all(q.text != o.text for o in out):
            out.append(q)
        if len(out) == k:
            break
    return out


def _wrong(q: Question, rng: np.random.Generator) -> str:
    if q.kind == "colour":
        return [c for c in COLOURS if c != q.answer][int(rng.integers(len(COLOURS) - 1))]
    if q.kind == "shape":
        return [s for s in SHAPES if s != q.answer][int(rng.integers(len(SHAPES) - 1))]
    if q.kind == "count":
        n = int(q.answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    return "no" if q.answer == "yes" else "yes"


def _variant(answer: str, rng: np.random.Generator) -> str:
    """The same answer as a person might type it: "Red", "red.", "two"."""
    if answer.isdigit() and int(answer) in NUMBER_WORDS and rng.random() < 0.5:
        return NUMBER_WORDS[int(answer)]
    return answer.capitalize() if rng.random() < 0.5 else answer + "."


def annotator_answers(q: Question, rng: np.random.Generator) -> list[dict]:
    """Ten VQA answers (answer_id 1..10): mostly right, sometimes varied in form or wrong (never a
    majority), with the annotators' confidence."""
    n_wrong = int(rng.choice([0, 0, 0, 1, 2, 3]))
    n_variant = int(rng.choice([0, 0, 1, 2]))
    kinds = ["wrong"] * n_wrong + ["variant"] * n_variant + ["right"] * (10 - n_wrong - n_variant)
    out = []
    for aid, kind in enumerate(rng.permutation(kinds), start=1):
        if kind == "wrong":
            ans, conf = _wrong(q, rng), ("maybe", "no", "yes")[int(rng.integers(3))]
        else:
            ans = _variant(q.answer, rng) if kind == "variant" else q.answer
            conf = "yes" if rng.random() < 0.85 else "maybe"
        out.append({"answer": ans, "answer_confidence": conf, "answer_id": aid})
    return out
