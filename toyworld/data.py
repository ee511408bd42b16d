"""The toy world: scenes of one to three flat shapes on simple backgrounds, with captions in varied English.

Everything is a pure function of a seed: `scene(seed)` draws a Scene, `render(scene)` draws it anti-aliased
(4x supersampled), `caption(scene, seed)` words it. Training uses seeds from TRAIN_SEED0 on; the evaluation set
is a fixed range of its own (EVAL_SEED0 ...), and training skips any scene whose caption text is in it.
"""

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256  # the embedded default's base resolution
SUPERSAMPLE = 4
TRAIN_SEED0 = 0
EVAL_SEED0 = 1_000_000

# name -> RGB. Pairs drawn as object-on-background are at least MIN_CONTRAST apart.
COLORS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 225, 45),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 180),
    "pink": (245, 145, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
MIN_CONTRAST = 90.0
COLOR_WORDS = {
    "red": ["red", "red", "crimson", "scarlet"],
    "orange": ["orange", "orange", "tangerine"],
    "yellow": ["yellow", "yellow", "golden"],
    "green": ["green", "green", "emerald"],
    "blue": ["blue", "blue", "azure", "navy"],
    "purple": ["purple", "purple", "violet"],
    "pink": ["pink", "pink", "rose"],
    "white": ["white", "white", "snowy", "ivory"],
    "black": ["black", "black", "jet black"],
    "grey": ["grey", "gray", "grey", "silver"],
}
SHAPES = ("circle", "square", "triangle", "star", "ring")
SHAPE_WORDS = {
    "circle": (["circle", "disc", "dot", "circle"], ["circles", "discs", "dots"]),
    "square": (["square", "box", "square", "block"], ["squares", "boxes", "blocks"]),
    "triangle": (["triangle", "triangle"], ["triangles"]),
    "star": (["star", "star"], ["stars"]),
    "ring": (["ring", "donut", "hoop", "ring"], ["rings", "donuts", "hoops"]),
}
RADIUS = {"small": (19, 24), "large": (40, 48)}  # half the object's extent, pixels at SIZE
# 3x3 grid cells (col, row) and their names; the centre of a cell sits at 0.2 / 0.5 / 0.8 of the side.
CELLS = {
    (1, 1): "centre", (0, 1): "left", (2, 1): "right", (1, 0): "top", (1, 2): "bottom",
    (0, 0): "top left", (2, 0): "top right", (0, 2): "bottom left", (2, 2): "bottom right",
}
CELL_AT = (0.2, 0.5, 0.8)
HORIZON = 0.6  # the sky covers the top 60% of a horizon background


@dataclass
class Obj:
    shape: str
    color: str
    size: str  # small | large
    cell: tuple[int, int]
    cx: float  # centre, pixels
    cy: float
    r: float  # half extent, pixels


@dataclass
class Background:
    kind: str  # plain | vgradient (top -> bottom) | hgradient (left -> right) | horizon (sky over ground)
    colors: tuple[str, ...]  # one for plain, two otherwise (first = top / left / sky)


@dataclass
class Scene:
    kind: str  # single | count | relation
    background: Background
    objects: list[Obj]
    relation: str | None = None  # relation scenes: objects[0] is <relation> objects[1]
    show_position: bool = True  # single scenes: whether the caption names the cell
    meta: dict = field(default_factory=dict)


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.subtract(COLORS[a], COLORS[b], dtype=float)))


def background_rgb(bg: Background, size: int = SIZE) -> np.ndarray:
    """[size, size, 3] float RGB of a background alone."""
    c = [np.array(COLORS[n], dtype=np.float32) for n in bg.colors]
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if bg.kind == "plain":
        return np.broadcast_to(c[0], (size, size, 3)).copy()
    if bg.kind == "vgradient":
        col = c[0][None, :] * (1 - t[:, None]) + c[1][None, :] * t[:, None]  # [size, 3], row-wise
        return np.broadcast_to(col[:, None, :], (size, size, 3)).copy()
    if bg.kind == "hgradient":
        row = c[0][None, :] * (1 - t[:, None]) + c[1][None, :] * t[:, None]
        return np.broadcast_to(row[None, :, :], (size, size, 3)).copy()
    split = int(round(HORIZON * size))
    out = np.empty((size, size, 3), dtype=np.float32)
    out[:split], out[split:] = c[0], c[1]
    return out


def _far_from_background(color: str, bg: Background) -> bool:
    """Object colours keep MIN_CONTRAST from every colour the background shows (gradient blends included)."""
    a = np.array(COLORS[bg.colors[0]], dtype=float)
    b = np.array(COLORS[bg.colors[-1]], dtype=float)
    ts = np.linspace(0, 1, 11) if bg.kind in ("vgradient", "hgradient") else np.array([0.0, 1.0])
    pts = a[None] * (1 - ts[:, None]) + b[None] * ts[:, None]
    return bool(np.linalg.norm(pts - np.array(COLORS[color], dtype=float)[None], axis=1).min() >= MIN_CONTRAST)


def _background(rng: random.Random) -> Background:
    names = list(COLORS)
    kind = rng.choices(["plain", "vgradient", "hgradient", "horizon"], weights=[6, 1.5, 1.5, 2])[0]
    if kind == "plain":
        return Background(kind, (rng.choice(names),))
    while True:
        a, b = rng.sample(names, 2)
        if _dist(a, b) >= MIN_CONTRAST:
            return Background(kind, (a, b))


def _place(rng: random.Random, cell, size: str) -> tuple[float, float, float]:
    r = rng.uniform(*RADIUS[size])
    jitter = 0.035 * SIZE
    cx = CELL_AT[cell[0]] * SIZE + rng.uniform(-jitter, jitter)
    cy = CELL_AT[cell[1]] * SIZE + rng.uniform(-jitter, jitter)
    m = r + 3
    return min(max(cx, m), SIZE - m), min(max(cy, m), SIZE - m), r


def scene(seed: int) -> Scene:
    """A random scene, a pure function of `seed`."""
    rng = random.Random(seed)
    bg = _background(rng)
    colors = [c for c in COLORS if _far_from_background(c, bg)]
    kind = rng.choices(["single", "count", "relation"], weights=[5, 2, 3])[0]
    cells = list(CELLS)
    if kind == "single":
        cell, size = rng.choice(cells), rng.choice(["small", "large"])
        objs = [Obj(rng.choice(SHAPES), rng.choice(colors), size, cell, *_place(rng, cell, size))]
        return Scene(kind, bg, objs, show_position=rng.random() < 0.85)
    if kind == "count":
        n, shape, color = rng.choice([2, 3]), rng.choice(SHAPES), rng.choice(colors)
        # Distinct cells, never adjacent in a row or column, so the objects never touch.
        while True:
            picked = rng.sample(cells, n)
            if all(abs(a[0] - b[0]) + abs(a[1] - b[1]) >= 2 for i, a in enumerate(picked) for b in picked[i + 1:]):
                break
        objs = [Obj(shape, color, "small", c, *_place(rng, c, "small")) for c in picked]
        return Scene(kind, bg, objs)
    # relation: objects[0] is <relation> objects[1], two cells apart along one axis.
    relation = rng.choice(["left of", "right of", "above", "below"])
    lane = rng.randrange(3)
    near, far = (0, 2)
    a_idx, b_idx = {"left of": (near, far), "right of": (far, near), "above": (near, far), "below": (far, near)}[relation]
    horizontal = relation in ("left of", "right of")
    cell_a = (a_idx, lane) if horizontal else (lane, a_idx)
    cell_b = (b_idx, lane) if horizontal else (lane, b_idx)
    shape_a, shape_b = rng.sample(SHAPES, 2) if rng.random() < 0.7 else [rng.choice(SHAPES)] * 2
    color_a, color_b = rng.sample(colors, 2)
    size_a, size_b = rng.choice(["small", "large"]), rng.choice(["small", "large"])
    objs = [
        Obj(shape_a, color_a, size_a, cell_a, *_place(rng, cell_a, size_a)),
        Obj(shape_b, color_b, size_b, cell_b, *_place(rng, cell_b, size_b)),
    ]
    return Scene(kind, bg, objs, relation=relation)


# --- rendering ----------------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # pointing up
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    # star: five points, pointing up
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.42
        ang = -np.pi / 2 + k * np.pi / 5
        pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang) + r * 0.1))
    return pts


def _mask(o: Obj, size: int) -> np.ndarray:
    """[size, size] float coverage of one object in [0, 1]: drawn at SUPERSAMPLE x, box-filtered down."""
    big = size * SUPERSAMPLE
    k = big / SIZE  # scene coordinates are at SIZE
    cx, cy, r = o.cx * k, o.cy * k, o.r * k
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if o.shape in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if o.shape == "ring":
            inner = r * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif o.shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=255)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=255)
    return np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def render(s: Scene, size: int = SIZE) -> np.ndarray:
    """[size, size, 3] uint8 RGB: background, then each object composited with its anti-aliased coverage."""
    out = background_rgb(s.background, size)
    for o in s.objects:
        alpha = _mask(o, size)[..., None]  # [size, size, 1]
        out = out * (1 - alpha) + np.array(COLORS[o.color], dtype=np.float32) * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


# --- captions -----------------------------------------------------------------------------------------------------

_NUM = {2: ["two", "2", "a pair of"], 3: ["three", "3"]}
_CELL_PHRASES = {
    "centre": ["in the centre", "in the center", "in the middle", "at the centre"],
    "left": ["on the left", "at the left", "on the left side"],
    "right": ["on the right", "at the right", "on the right side"],
    "top": ["at the top", "near the top", "at the top edge"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom edge"],
}
_RELATION_PHRASES = {
    "left of": ["to the left of", "left of", "on the left of"],
    "right of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
}


def _cell_phrase(rng: random.Random, cell_name: str) -> str:
    if cell_name in _CELL_PHRASES:
        return rng.choice(_CELL_PHRASES[cell_name])
    return rng.choice([f"in the {cell_name} corner", f"at the {cell_name}", f"in the {cell_name}"])


def _color(rng: random.Random, name: str) -> str:
    return rng.choice(COLOR_WORDS[name])


def _bg_phrase(rng: random.Random, bg: Background) -> str:
    a = _color(rng, bg.colors[0])
    if bg.kind == "plain":
        return rng.choice([f"on {_article(a)} {a} background", f"on {a}", f"against {_article(a)} {a} backdrop",
                       f"on a plain {a} background"])
    b = _color(rng, bg.colors[1])
    if bg.kind == "vgradient":
        return rng.choice([f"on a gradient from {a} at the top to {b} at the bottom", f"on {_article(a)} {a} to {b} vertical gradient",
                           f"on a background fading from {a} at the top to {b} below"])
    if bg.kind == "hgradient":
        return rng.choice([f"on a gradient from {a} on the left to {b} on the right", f"on {_article(a)} {a} to {b} horizontal gradient",
                           f"on a background fading from {a} on the left to {b} on the right"])
    return rng.choice([f"under {_article(a)} {a} sky above {b} ground", f"with {_article(a)} {a} sky over {b} ground",
                       f"on a horizon of {a} sky and {b} ground"])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(rng: random.Random, o: Obj, with_size: bool) -> str:
    words = ([o.size] if with_size else []) + [_color(rng, o.color), rng.choice(SHAPE_WORDS[o.shape][0])]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(s: Scene, seed: int) -> str:
    """English for a scene; the wording varies with `seed` (synonyms, order, optional words)."""
    rng = random.Random(seed * 7919 + 13)
    bg = _bg_phrase(rng, s.background)
    if s.kind == "single":
        o = s.objects[0]
        thing = _noun_phrase(rng, o, with_size=rng.random() < 0.8)
        where = _cell_phrase(rng, CELLS[o.cell]) if s.show_position else ""
        forms = [f"{thing} {where} {bg}", f"{thing} {bg} {where}"]
        if where:
            lead = bg[3:] if bg.startswith("on ") else bg
            forms.append(f"{lead}, {thing} {where}")
        text = rng.choice(forms)
    elif s.kind == "count":
        o = s.objects[0]
        n = len(s.objects)
        words = ([o.size] if rng.random() < 0.4 else []) + [_color(rng, o.color), rng.choice(SHAPE_WORDS[o.shape][1])]
        text = f"{rng.choice(_NUM[n])} {' '.join(words)} {bg}"
    else:
        a, b = s.objects
        rel = rng.choice(_RELATION_PHRASES[s.relation])
        text = f"{_noun_phrase(rng, a, rng.random() < 0.5)} {rel} {_noun_phrase(rng, b, rng.random() < 0.5)} {bg}"
    return " ".join(text.split())


def sample(seed: int) -> tuple[Scene, str]:
    s = scene(seed)
    return s, caption(s, seed)


def eval_set(n: int = 200, first: int = 0) -> list[tuple[int, Scene, str]]:
    """`n` held-aside evaluation captions from the `first`: seeds EVAL_SEED0 + first .. EVAL_SEED0 + first + n - 1."""
    return [(seed, *sample(seed)) for seed in range(EVAL_SEED0 + first, EVAL_SEED0 + first + n)]


HELD_N = 1000  # the eval seeds whose captions training never sees: the reported set, the tuning set and spare


def held_captions(eval_n: int = HELD_N) -> set[str]:
    """The captions of the first `eval_n` eval seeds: no training caption is one of them."""
    return {c for _, _, c in eval_set(eval_n)}


def train_set(n: int, eval_n: int = HELD_N) -> list[tuple[int, Scene, str]]:
    """`n` training samples from TRAIN_SEED0 on, skipping any caption of the first `eval_n` eval seeds."""
    held = held_captions(eval_n)
    out, seed = [], TRAIN_SEED0
    while len(out) < n:
        s, c = sample(seed)
        if c not in held:
            out.append((seed, s, c))
        seed += 1
    return out
