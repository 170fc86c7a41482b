"""The synthetic shapes world, part 1: what a scene is, how scenes are sampled and perturbed.

A static scene is an ordered tuple of `Thing`s (size, colour, shape) in a `layout`: `single`,
`row` (left to right) or `column` (top to bottom); the pair is its canonical description, the
thing captions are compared against. `free` scenes (VQA, GQA, grounding) place 1-4 things
anywhere. A video scene is a set of `Mover`s (a thing plus a motion). Pixels are drawn by
`shapes_render`, words by `shapes_text`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 85, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 55, 200),
    "orange": (250, 135, 20),
}
SIZES = ("small", "large")
MOTIONS = ("left", "right", "up", "down", "still")

# Radii as a share of the image side: three large things must fit in one row with gaps.
RADIUS = {"small": 0.065, "large": 0.12}
VIDEO_RADIUS = {"small": 0.09, "large": 0.16}


@dataclass(frozen=True)
class Thing:
    """The attributes a caption can name."""

    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class Background:
    """Plain colour, two-colour gradient or noise over a muted base; never a saturated colour."""

    kind: str  # plain | gradient | noise
    base: tuple[int, int, int]
    other: tuple[int, int, int]
    direction: str  # horizontal | vertical | diagonal (gradients)
    sigma: float  # noise strength
    seed: int


@dataclass(frozen=True)
class Placed:
    """A thing drawn at centre (cx, cy) with radius r, in pixels."""

    thing: Thing
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    """A static scene; `things` are in canonical order (left->right in a row, top->bottom in a column)."""

    layout: str  # single | row | column | free
    things: tuple[Thing, ...]
    background: Background
    placed: tuple[Placed, ...] = ()

    @property
    def canonical(self) -> tuple[str, tuple[Thing, ...]]:
        return (self.layout, self.things)


@dataclass(frozen=True)
class Mover:
    """A thing that moves in one direction (or stays still) during a video."""

    thing: Thing
    motion: str
    start: tuple[float, float]  # centre at the first frame, pixels
    r: float


@dataclass(frozen=True)
class VideoScene:
    movers: tuple[Mover, ...]
    background: Background
    num_frames: int
    size: int
    travel: float  # pixels moved from first to last frame

    @property
    def canonical(self) -> frozenset[tuple[Thing, str]]:
        return frozenset((m.thing, m.motion) for m in self.movers)


def random_thing(rng: np.random.Generator) -> Thing:
    """A thing with uniformly drawn size, colour and shape."""
    return Thing(
        SIZES[rng.integers(len(SIZES))],
        list(COLOURS)[rng.integers(len(COLOURS))],
        SHAPES[rng.integers(len(SHAPES))],
    )


def random_background(rng: np.random.Generator) -> Background:
    """Muted colours (low saturation) so that no background reads as an object colour."""

    def muted() -> tuple[int, int, int]:
        grey = rng.uniform(60, 200)
        tint = rng.uniform(-18, 18, size=3)
        return tuple(int(np.clip(grey + t, 0, 255)) for t in tint)  # type: ignore[return-value]

    kind = ("plain", "gradient", "noise")[rng.integers(3)]
    return Background(
        kind=kind,
        base=muted(),
        other=muted(),
        direction=("horizontal", "vertical", "diagonal")[rng.integers(3)],
        sigma=float(rng.uniform(8, 22)),
        seed=int(rng.integers(2**31)),
    )


def sample_things(rng: np.random.Generator, n: int, repeat_prob: float = 0.25) -> tuple[Thing, ...]:
    """`n` things; with `repeat_prob` a thing copies an earlier one, so counts ("two red circles") occur."""
    things: list[Thing] = []
    for i in range(n):
        if i and rng.random() < repeat_prob:
            things.append(things[int(rng.integers(i))])
        else:
            things.append(random_thing(rng))
    return tuple(things)


def sample_scene(rng: np.random.Generator, counts=(0.15, 0.45, 0.40)) -> Scene:
    """A single / row / column scene of 1-3 things (`counts` = probabilities of 1, 2, 3 things)."""
    n = 1 + int(rng.choice(len(counts), p=np.asarray(counts) / sum(counts)))
    layout = "single" if n == 1 else ("row", "column")[rng.integers(2)]
    return Scene(layout, sample_things(rng, n), random_background(rng))


def perturb(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """A hard negative of `scene`: swapped colours or sizes, mirrored or transposed layout, or one
    attribute changed. None when the drawn perturbation leaves the description unchanged."""
    things = list(scene.things)
    n = len(things)
    op = ("swap_colour", "swap_size", "mirror", "transpose", "recolour", "reshape", "resize")[
        rng.integers(7)
    ]
    i, j = (rng.choice(n, 2, replace=False) if n > 1 else (0, 0))
    layout = scene.layout
    if op == "swap_colour" and n > 1:
        things[i], things[j] = (replace(things[i], colour=things[j].colour),
                                replace(things[j], colour=things[i].colour))
    elif op == "swap_size" and n > 1:
        things[i], things[j] = (replace(things[i], size=things[j].size),
                                replace(things[j], size=things[i].size))
    elif op == "mirror":
        things.reverse()
    elif op == "transpose" and n > 1:
        layout = "column" if layout == "row" else "row"
    elif op == "recolour":
        others = [c for c in COLOURS if c != things[i].colour]
        things[i] = replace(things[i], colour=others[rng.integers(len(others))])
    elif op == "reshape":
        others = [s for s in SHAPES if s != things[i].shape]
        things[i] = replace(things[i], shape=others[rng.integers(len(others))])
    elif op == "resize":
        things[i] = replace(things[i], size="large" if things[i].size == "small" else "small")
    new = Scene(layout, tuple(things), random_background(rng))
    return None if new.canonical == scene.canonical else new


# -- placement --------------------------------------------------------------------------------
def _line_positions(radii: list[float], side: float, rng: np.random.Generator) -> list[float]:
    """Centres along one axis: random gaps that always keep things apart and inside the image."""
    margin, min_gap = 0.035 * side, 0.05 * side
    slack = side - 2 * margin - 2 * sum(radii) - min_gap * (len(radii) - 1)
    if slack < 0:
        raise ValueError("things do not fit in one line; shrink RADIUS")
    shares = rng.dirichlet(np.ones(len(radii) + 1)) * slack
    pos, out = margin + shares[0], []
    for k, r in enumerate(radii):
        out.append(pos + r)
        pos += 2 * r + min_gap + shares[k + 1]
    return out


def place(scene: Scene, side: int, rng: np.random.Generator) -> Scene:
    """Pixel positions for `scene` in a `side` x `side` image, consistent with its layout."""
    radii = [RADIUS[t.size] * side * rng.uniform(0.92, 1.08) for t in scene.things]
    if scene.layout == "free":
        return replace(scene, placed=tuple(_free_positions(scene.things, radii, side, rng)))
    if scene.layout == "single":
        r = radii[0]
        cx, cy = rng.uniform(r + 2, side - r - 2, size=2)
        return replace(scene, placed=(Placed(scene.things[0], float(cx), float(cy), r),))
    along = _line_positions(radii, side, rng)
    rmax = max(radii)
    base = rng.uniform(rmax + 0.035 * side, side - rmax - 0.035 * side)
    # a small wobble across the line, far below the spacing along it, keeps "left of" unambiguous
    across = [float(np.clip(base + rng.uniform(-0.04, 0.04) * side, r + 1, side - r - 1)) for r in radii]
    placed = []
    for t, r, a, c in zip(scene.things, radii, along, across):
        cx, cy = (a, c) if scene.layout == "row" else (c, a)
        placed.append(Placed(t, float(cx), float(cy), r))
    return replace(scene, placed=tuple(placed))


def _free_positions(things, radii, side, rng) -> list[Placed]:
    """Rejection-sample non-overlapping centres (with a gap) anywhere in the image."""
    for _ in range(200):
        out: list[Placed] = []
        for t, r in zip(things, radii):
            for _ in range(50):
                cx, cy = rng.uniform(r + 2, side - r - 2, size=2)
                if all(np.hypot(cx - p.cx, cy - p.cy) > r + p.r + 0.04 * side for p in out):
                    out.append(Placed(t, float(cx), float(cy), r))
                    break
        if len(out) == len(things):
            return out
    raise RuntimeError("could not place the things without overlap")


def sample_free_scene(rng: np.random.Generator, side: int, min_things: int = 1, max_things: int = 4) -> Scene:
    """A scene of `min_things`-`max_things` things placed anywhere (questions, referring expressions)."""
    n = int(rng.integers(min_things, max_things + 1))
    scene = Scene("free", sample_things(rng, n, repeat_prob=0.2), random_background(rng))
    return place(scene, side, rng)


def sample_video_scene(rng: np.random.Generator, side: int, frames: tuple[int, int]) -> VideoScene:
    """One or two things, at least one moving; each keeps to its own half of the frame."""
    n = 1 + int(rng.random() < 0.5)
    things = [random_thing(rng) for _ in range(n)]
    if n == 2 and things[0] == things[1]:
        things[1] = replace(things[1], colour=[c for c in COLOURS if c != things[0].colour][0])
    motions = [MOTIONS[rng.integers(4)]] + [MOTIONS[rng.integers(5)] for _ in range(n - 1)]
    travel = 0.45 * side
    movers = []
    for k, (t, m) in enumerate(zip(things, motions)):
        r = VIDEO_RADIUS[t.size] * side
        # lane: left/right half for vertical motion, top/bottom half otherwise (one half if alone)
        lo, hi = (0.0, side) if n == 1 else ((0.0, side / 2) if k == 0 else (side / 2, side))
        cross = rng.uniform(lo + r + 1, hi - r - 1)
        dx = {"left": -1, "right": 1}.get(m, 0)
        dy = {"up": -1, "down": 1}.get(m, 0)
        span_lo, span_hi = r + 1, side - r - 1
        # start so that the whole path stays inside the frame
        s_lo = span_lo + travel * max(0, -(dx or dy))
        s_hi = span_hi - travel * max(0, dx or dy)
        along = rng.uniform(s_lo, s_hi) if m != "still" else rng.uniform(span_lo, span_hi)
        start = (along, cross) if m in ("left", "right") or (m == "still" and k == 0) else (cross, along)
        movers.append(Mover(t, m, (float(start[0]), float(start[1])), r))
    n_frames = int(rng.integers(frames[0], frames[1] + 1))
    return VideoScene(tuple(movers), random_background(rng), n_frames, side, travel)


def mover_position(m: Mover, frame: int, scene: VideoScene) -> tuple[float, float]:
    """Centre of mover `m` at `frame` (linear motion over the clip)."""
    f = frame / max(scene.num_frames - 1, 1) * scene.travel
    dx = {"left": -f, "right": f}.get(m.motion, 0.0)
    dy = {"up": -f, "down": f}.get(m.motion, 0.0)
    return m.start[0] + dx, m.start[1] + dy
