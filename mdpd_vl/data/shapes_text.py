"""The synthetic shapes world, part 3: words. Captions, motion captions and referring expressions.

Every caption is produced together with its **claim**, the meaning the words commit to:
`(layout, slots)` with one `(size or None, colour, shape)` slot per thing in canonical order
(`None` where the wording leaves the size out). `claim_matches` compares a claim with a scene's
canonical description, which is how the generator measures how many test captions fit more than
one test scene. Questions live in `shapes_qa`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mdpd_vl.data.shapes_scenes import Scene, Thing, VideoScene

Slot = tuple[str | None, str, str]
Claim = tuple[str, tuple[Slot, ...]]
VideoClaim = tuple[tuple[str | None, str, str, str], ...]

SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
COUNT_WORDS = {2: "two", 3: "three"}

# Words per layout: `fwd` relates a thing to the next one in canonical order, `bwd` the reverse.
DIRECTION = {
    "row": {
        "fwd": ("left of", "to the left of", "on the left of"),
        "bwd": ("right of", "to the right of", "on the right of"),
        "first": ("on the left",),
        "last": ("on the right",),
        "order_fwd": ("from left to right",),
        "order_bwd": ("from right to left",),
        "same": ("side by side", "in a row", "next to each other"),
        "between": ("one on each side",),
        "line": ("row",),
    },
    "column": {
        "fwd": ("above", "over"),
        "bwd": ("below", "under", "beneath"),
        "first": ("at the top", "on top"),
        "last": ("at the bottom",),
        "order_fwd": ("from top to bottom",),
        "order_bwd": ("from bottom to top",),
        "same": ("stacked vertically", "in a column", "one above the other"),
        "between": ("one above and one below",),
        "line": ("column",),
    },
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(count: int, thing: Thing, rng: np.random.Generator, sizes: bool = True) -> str:
    """"a small red circle", "two big blue stars"; the size left out when `sizes` is False."""
    words = ([_pick(rng, SIZE_WORDS[thing.size])] if sizes else []) + [thing.colour, thing.shape]
    if count == 1:
        return f"{article(words[0])} {' '.join(words)}"
    return f"{COUNT_WORDS[count]} {' '.join(words)}s"


def _groups(things: Sequence[Thing]) -> list[tuple[int, Thing]]:
    """Runs of identical consecutive things: (A, A, B) -> [(2, A), (1, B)]."""
    out: list[tuple[int, Thing]] = []
    for t in things:
        if out and out[-1][1] == t:
            out[-1] = (out[-1][0] + 1, t)
        else:
            out.append((1, t))
    return out


def _slots(groups: Sequence[tuple[int, Thing]], sizes: bool) -> tuple[Slot, ...]:
    return tuple((t.size if sizes else None, t.colour, t.shape) for c, t in groups for _ in range(c))


def _templates(scene: Scene, sizes: bool, rng: np.random.Generator) -> list[tuple[str, Claim]]:
    """Every applicable phrasing of `scene` with its claim; synonyms drawn from `rng`."""
    g = _groups(scene.things)
    n, layout = len(scene.things), scene.layout

    def NP(i: int) -> str:
        return noun_phrase(g[i][0], g[i][1], rng, sizes)

    if layout == "single":
        claim: Claim = ("single", _slots(g, sizes))
        bare = NP(0).split(" ", 1)[1]
        texts = [NP(0), f"there is {NP(0)}", f"a picture of {NP(0)}", f"{NP(0)} on its own",
                 f"a single {bare}", f"one {bare}", f"an image with {NP(0)}"]
        return [(t, claim) for t in texts]
    d = {k: (lambda k=k: _pick(rng, DIRECTION[layout][k])) for k in DIRECTION[layout]}
    fwd_claim: Claim = (layout, _slots(g, sizes))
    if len(g) == 1:
        same = [s for s in DIRECTION[layout]["same"] if n == 2 or "other" not in s]
        texts = [f"{NP(0)} {s}" for s in same] + [
            f"there are {NP(0)} {_pick(rng, same)}", f"a {d['line']()} of {NP(0)}",
        ]
        return [(t, fwd_claim) for t in texts]
    if len(g) == 2:
        be = "is" if g[0][0] == 1 else "are"
        texts = [
            f"{NP(0)} {d['fwd']()} {NP(1)}",
            f"{NP(1)} {d['bwd']()} {NP(0)}",
            f"{NP(0)} {d['first']()} and {NP(1)} {d['last']()}",
            f"{NP(1)} {d['last']()} and {NP(0)} {d['first']()}",
            f"there {be} {NP(0)} {d['fwd']()} {NP(1)}",
            f"a picture of {NP(1)} {d['bwd']()} {NP(0)}",
        ]
        return [(t, fwd_claim) for t in texts]
    texts = [
        f"{NP(0)}, {NP(1)} and {NP(2)} {d['order_fwd']()}",
        f"{NP(2)}, {NP(1)} and {NP(0)} {d['order_bwd']()}",
        f"{NP(1)} between {NP(0)} {d['first']()} and {NP(2)} {d['last']()}",
        f"{NP(0)} {d['fwd']()} {NP(1)}, which is {d['fwd']()} {NP(2)}",
        f"{NP(2)} {d['bwd']()} {NP(1)}, which is {d['bwd']()} {NP(0)}",
        f"a {d['line']()} with {NP(0)}, {NP(1)} and {NP(2)} {d['order_fwd']()}",
    ]
    if g[0][1] == g[2][1]:  # A B A: "a blue square between two red circles, one on each side"
        texts.append(f"{NP(1)} between {noun_phrase(2, g[0][1], rng, sizes)}, {d['between']()}")
    return [(t, fwd_claim) for t in texts]


def _sizes_droppable(things: Sequence[Thing]) -> bool:
    """Sizes may be left out only if no two things then read the same (colour and shape)."""
    keys = [(t.colour, t.shape) for t in things]
    return len(set(keys)) == len(keys)


def image_captions(scene: Scene, rng: np.random.Generator, k: int = 5,
                   drop_size_prob: float = 0.3) -> list[tuple[str, Claim]]:
    """`k` captions of `scene` from different templates, each with its claim.

    With `drop_size_prob` one caption leaves the sizes out ("a red circle left of a blue square"),
    a weaker claim that the ambiguity check must then also find unique.
    """
    full = _templates(scene, True, rng)
    order = rng.permutation(len(full))
    out = [full[i] for i in order[:k]]
    while len(out) < k:  # few templates (single things): reuse them with other synonyms
        out.append(_templates(scene, True, rng)[int(rng.integers(len(full)))])
    if _sizes_droppable(scene.things) and rng.random() < drop_size_prob:
        bare = _templates(scene, False, rng)
        out[-1] = bare[int(rng.integers(len(bare)))]
    return out


def claim_matches(claim: Claim, canonical: tuple[str, tuple[Thing, ...]]) -> bool:
    """True when the scene with this canonical description makes the claim true."""
    layout, things = canonical
    if claim[0] != layout or len(claim[1]) != len(things):
        return False
    return all((s is None or s == t.size) and c == t.colour and h == t.shape
               for (s, c, h), t in zip(claim[1], things))


# -- videos -----------------------------------------------------------------------------------
MOTION_PHRASES = {
    "left": ("moves left", "is moving to the left", "slides to the left", "goes from right to left",
             "travels leftward"),
    "right": ("moves right", "is moving to the right", "slides to the right",
              "goes from left to right", "travels rightward"),
    "up": ("moves up", "is moving upward", "rises", "goes from the bottom to the top", "floats up"),
    "down": ("moves down", "is moving downward", "falls", "goes from the top to the bottom",
             "drops down"),
    "still": ("stays still", "does not move", "stays in place", "is not moving", "remains still"),
}


def video_captions(scene: VideoScene, rng: np.random.Generator, k: int,
                   drop_size_prob: float = 0.2) -> list[tuple[str, VideoClaim]]:
    """`k` captions about the motion ("a red circle moves left while a big blue star rises")."""
    movers = list(scene.movers)
    droppable = _sizes_droppable([m.thing for m in movers])
    out: list[tuple[str, VideoClaim]] = []
    seen: set[str] = set()
    for _ in range(k * 20):
        if len(out) == k:
            break
        sizes = not (droppable and rng.random() < drop_size_prob)
        order = rng.permutation(len(movers))
        clauses = [f"{noun_phrase(1, movers[i].thing, rng, sizes)} "
                   f"{_pick(rng, MOTION_PHRASES[movers[i].motion])}" for i in order]
        if len(clauses) == 1:
            text = clauses[0]
        else:
            text = _pick(rng, ("{} while {}", "{} and {}", "{}, and at the same time {}")).format(*clauses)
        claim = tuple(sorted((m.thing.size if sizes else None, m.thing.colour, m.thing.shape, m.motion)
                             for m in movers))
        if text not in seen or len(seen) > 4 * k:
            seen.add(text)
            out.append((text, claim))
    return out


def video_claim_matches(claim: VideoClaim, canonical: frozenset[tuple[Thing, str]]) -> bool:
    """True when the video with this canonical description makes the claim true (any pairing)."""
    if len(claim) != len(canonical):
        return False
    remaining = list(canonical)
    for size, colour, shape, motion in claim:
        for j, (t, m) in enumerate(remaining):
            if m == motion and t.colour == colour and t.shape == shape and size in (None, t.size):
                del remaining[j]
                break
        else:
            return False
    return True


def ambiguous_share(claims: Sequence, canonicals: Sequence, matches) -> float:
    """Share of claims that fit more than one of `canonicals` (a fit of its own scene is required)."""
    if not claims:
        return 0.0
    bad = 0
    for claim in claims:
        hits = sum(1 for c in canonicals if matches(claim, c))
        if hits == 0:
            raise AssertionError(f"caption claim {claim} fits no scene: a template bug")
        bad += hits > 1
    return bad / len(claims)


# -- referring expressions ---------------------------------------------------------------------
def referring_expressions(scene: Scene, target: int, rng: np.random.Generator, side: int,
                          k: int = 3) -> list[str]:
    """Up to `k` expressions that single out `scene.placed[target]` and nothing else in the scene."""
    placed = list(scene.placed)
    me = placed[target].thing
    gap = 0.12 * side

    def unique(pred) -> bool:
        return [i for i, p in enumerate(placed) if pred(p)] == [target]

    cands: list[tuple[str, object]] = [
        (f"the {me.shape}", lambda p: p.thing.shape == me.shape),
        (f"the {me.colour} {_pick(rng, ('shape', 'one', 'object'))}", lambda p: p.thing.colour == me.colour),
        (f"the {me.colour} {me.shape}", lambda p: (p.thing.colour, p.thing.shape) == (me.colour, me.shape)),
        (f"the {_pick(rng, SIZE_WORDS[me.size])} {me.shape}",
         lambda p: (p.thing.size, p.thing.shape) == (me.size, me.shape)),
        (f"the {_pick(rng, SIZE_WORDS[me.size])} {me.colour} {me.shape}", lambda p: p.thing == me),
    ]
    same = [p for p in placed if (p.thing.colour, p.thing.shape) == (me.colour, me.shape)]
    tx, ty = placed[target].cx, placed[target].cy
    others = [p for p in same if p is not placed[target]]
    for word, ok in (("on the left", all(p.cx - tx > gap for p in others)),
                     ("on the right", all(tx - p.cx > gap for p in others)),
                     ("at the top", all(p.cy - ty > gap for p in others)),
                     ("at the bottom", all(ty - p.cy > gap for p in others))):
        if others and ok:
            cands.append((f"the {me.colour} {me.shape} {word}", lambda p: p is placed[target]))
    everyone = [p for p in placed if p is not placed[target]]
    for word, ok in (("leftmost", all(p.cx - tx > gap for p in everyone)),
                     ("rightmost", all(tx - p.cx > gap for p in everyone))):
        if len(placed) > 2 and ok:
            cands.append((f"the {word} {_pick(rng, ('shape', 'object'))}", lambda p: p is placed[target]))
    good = [text for text, pred in cands if unique(pred)]
    if not good:
        return []
    pick = rng.permutation(len(good))[:k]
    return [good[i] for i in sorted(pick)]
