"""Procedural 64x64 shape scenes with exact captions, and a deterministic checker of prompt adherence.

The grammar (issue 6) is fixed, so a checker can parse every caption:
    a {small|large} {color} {shape} {position}
    {two|three|four} small {color} {shape}s                       (no overlaps)
    {a|an} {color} {shape} {to the left of|to the right of|above|below} {a|an} {color} {shape}
Size is half the bounding-box width (small 5-7 px, large 11-14 px); a position names the cell of a 3x3 grid that
holds the object's centre (the centre of its bounding box); a relation needs two colours and centres at least
12 px apart along the named axis and less apart along the other one. Captions containing a green circle, a
purple square, a yellow triangle or an orange diamond are held out of training to test unseen compositions.

Shapes are rasterised by exact point-in-shape tests on a 4x4 subpixel grid (antialiased, colours exact inside),
and the checker fits the same coverage templates to what it segments, so it reads the generator's own images
essentially perfectly and stays tolerant of a model's blurry ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import os

import numpy as np

IMAGE = 64
CELL = IMAGE / 3
PALETTE = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (235, 210, 20), "green": (30, 160, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (5.0, 7.0), "large": (11.0, 14.0)}
POSITIONS = (  # row-major cells of the 3x3 grid
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
COUNTS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("single", "count", "relation")
HELD_OUT = ("green circle", "purple square", "yellow triangle", "orange diamond")
MIN_RELATION_GAP = 12.0

SUPERSAMPLE = 4  # subpixels per side
GAP = 3.0  # px of white kept between bounding boxes, so objects never touch
CELL_MARGIN = 1.5  # px kept between a single object's centre and its cell's border
SIZE_SPLIT = 9.0  # checker: half-widths below are "small"
CORE_ALPHA = 0.5  # checker: a pixel belongs to an object when more than half covered
COLOR_TOL = 60.0  # checker: max RGB distance of a pixel from the white-to-colour line
MIN_PIXELS = 10  # checker: smaller blobs are noise (a small triangle covers about 43 px)
AREA = {"circle": math.pi, "square": 4.0, "triangle": math.sqrt(3.0), "diamond": 2.0}  # area / s^2
EVAL_SEED, EVAL_PER_KIND = 20240606, 8

_COLOR = "(" + "|".join(PALETTE) + ")"
_SHAPE = "(" + "|".join(SHAPES) + ")"
_SINGLE = re.compile(rf"a (small|large) {_COLOR} {_SHAPE} ({'|'.join(POSITIONS)})")
_COUNT = re.compile(rf"({'|'.join(COUNTS)}) small {_COLOR} {_SHAPE}s")
_RELATION = re.compile(rf"(?:a|an) {_COLOR} {_SHAPE} ({'|'.join(RELATIONS)}) (?:a|an) {_COLOR} {_SHAPE}")


@dataclass(frozen=True)
class Obj:
    """One drawn (or detected) object: s is half the bounding-box width, (cx, cy) the box centre in px."""

    color: str
    shape: str
    s: float
    cx: float
    cy: float


# ----------------------------------------------------------------------------------------------- captions

def _article(color: str) -> str:
    return "an" if color[0] in "aeiou" else "a"


def is_held_out(caption: str) -> bool:
    """True for captions that name a green circle, purple square, yellow triangle or orange diamond."""
    return any(pair in caption for pair in HELD_OUT)


def parse_caption(caption: str) -> dict:
    """Caption -> {"kind", ...fields}; raises ValueError for anything outside the grammar."""
    if m := _SINGLE.fullmatch(caption):
        size, color, shape, position = m.groups()
        parsed = {"kind": "single", "size": size, "color": color, "shape": shape, "position": position}
    elif m := _COUNT.fullmatch(caption):
        word, color, shape = m.groups()
        parsed = {"kind": "count", "n": COUNTS[word], "color": color, "shape": shape}
    elif m := _RELATION.fullmatch(caption):
        c1, s1, relation, c2, s2 = m.groups()
        parsed = {"kind": "relation", "first": (c1, s1), "relation": relation, "second": (c2, s2)}
    else:
        raise ValueError(f"caption is not in the shapes grammar: {caption!r}")
    if format_caption(parsed) != caption or (parsed["kind"] == "relation" and c1 == c2):
        raise ValueError(f"caption is not in the shapes grammar (article or repeated colour): {caption!r}")
    return parsed


def format_caption(p: dict) -> str:
    """Inverse of parse_caption."""
    if p["kind"] == "single":
        return f"a {p['size']} {p['color']} {p['shape']} {p['position']}"
    if p["kind"] == "count":
        word = next(w for w, n in COUNTS.items() if n == p["n"])
        return f"{word} small {p['color']} {p['shape']}s"
    (c1, s1), (c2, s2) = p["first"], p["second"]
    return f"{_article(c1)} {c1} {s1} {p['relation']} {_article(c2)} {c2} {s2}"


# ----------------------------------------------------------------------------------------------- sampling

def sample_scene(rng: np.random.Generator, kind: str | None = None, held_out: bool = False) -> tuple[list[Obj], str]:
    """Draw a caption on the requested side of the held-out rule, then a layout that satisfies it."""
    if kind is None:
        kind = KINDS[rng.integers(len(KINDS))]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    while True:  # rejection on the words alone; geometry comes after
        parsed = _sample_words(rng, kind)
        caption = format_caption(parsed)
        if is_held_out(caption) == held_out:
            break
    return _place(rng, parsed), caption


def _choice(rng: np.random.Generator, options) -> str:
    options = list(options)
    return options[rng.integers(len(options))]


def _sample_words(rng: np.random.Generator, kind: str) -> dict:
    if kind == "single":
        return {"kind": kind, "size": _choice(rng, SIZES), "color": _choice(rng, PALETTE),
                "shape": _choice(rng, SHAPES), "position": _choice(rng, POSITIONS)}
    if kind == "count":
        return {"kind": kind, "n": COUNTS[_choice(rng, COUNTS)], "color": _choice(rng, PALETTE),
                "shape": _choice(rng, SHAPES)}
    c1 = _choice(rng, PALETTE)
    c2 = _choice(rng, [c for c in PALETTE if c != c1])
    return {"kind": kind, "first": (c1, _choice(rng, SHAPES)), "relation": _choice(rng, RELATIONS),
            "second": (c2, _choice(rng, SHAPES))}


def _size(rng: np.random.Generator, size: str) -> float:
    return float(rng.uniform(*SIZES[size]))


def _place(rng: np.random.Generator, p: dict) -> list[Obj]:
    if p["kind"] == "single":
        s = _size(rng, p["size"])
        row, col = divmod(POSITIONS.index(p["position"]), 3)
        # Centre inside its cell (with a margin) and the whole object inside the image.
        cx = rng.uniform(max(col * CELL + CELL_MARGIN, s + 1), min((col + 1) * CELL - CELL_MARGIN, IMAGE - 1 - s))
        cy = rng.uniform(max(row * CELL + CELL_MARGIN, s + 1), min((row + 1) * CELL - CELL_MARGIN, IMAGE - 1 - s))
        return [Obj(p["color"], p["shape"], s, float(cx), float(cy))]
    if p["kind"] == "count":
        while True:  # sequential rejection; restart when a crowded layout leaves no room
            objs = []
            for _ in range(100):
                s = _size(rng, "small")
                cx, cy = rng.uniform(s + 1, IMAGE - 1 - s, size=2)
                if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= s + o.s + GAP for o in objs):
                    objs.append(Obj(p["color"], p["shape"], s, float(cx), float(cy)))
                    if len(objs) == p["n"]:
                        return objs
    (c1, sh1), (c2, sh2) = p["first"], p["second"]
    while True:
        s1, s2 = _size(rng, _choice(rng, SIZES)), _size(rng, _choice(rng, SIZES))
        a = rng.uniform(s1 + 1, IMAGE - 1 - s1, size=2)
        b = rng.uniform(s2 + 1, IMAGE - 1 - s2, size=2)
        along, across = _relation_axes(p["relation"], a, b)
        # A margin over the checker's 12 px rule; separation along the named axis also keeps the boxes apart.
        if along >= max(MIN_RELATION_GAP + 1, s1 + s2 + GAP) and abs(across) <= along - 2:
            return [Obj(c1, sh1, s1, float(a[0]), float(a[1])), Obj(c2, sh2, s2, float(b[0]), float(b[1]))]


def _relation_axes(relation: str, a, b) -> tuple[float, float]:
    """Signed distance of the centres along the relation's axis (positive when it holds), and across it."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {"to the left of": (dx, dy), "to the right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]


# ---------------------------------------------------------------------------------------------- rendering

def coverage(shape: str, cx: float, cy: float, s: float,
             box: tuple[int, int, int, int] = (0, 0, IMAGE, IMAGE)) -> np.ndarray:
    """Fraction of each pixel of box (x0, y0, x1, y1) inside the shape: (y1 - y0, x1 - x0) float32 in [0, 1]."""
    x0, y0, x1, y1 = box
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    dx = ((np.arange(x0, x1)[:, None] + sub).ravel() - cx)[None, :]  # (1, W*4)
    dy = ((np.arange(y0, y1)[:, None] + sub).ravel() - cy)[:, None]  # (H*4, 1)
    if shape == "circle":
        inside = dx**2 + dy**2 <= s**2
    elif shape == "square":
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    elif shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= s
    elif shape == "triangle":  # upright equilateral, side 2s, height s*sqrt(3), box centred on (cx, cy)
        depth = dy + s * math.sqrt(3) / 2  # below the apex
        inside = (depth >= 0) & (depth <= s * math.sqrt(3)) & (np.abs(dx) <= depth / math.sqrt(3))
    else:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    h, w = y1 - y0, x1 - x0
    return inside.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3), dtype=np.float32)


def render(objs: list[Obj]) -> np.ndarray:
    """Objects over white -> (64, 64, 3) uint8; antialiased edges blend each colour with white only."""
    image = np.full((IMAGE, IMAGE, 3), 255.0, dtype=np.float32)
    for o in objs:
        alpha = coverage(o.shape, o.cx, o.cy, o.s)[..., None]  # (64, 64, 1)
        image = image * (1 - alpha) + np.array(PALETTE[o.color], dtype=np.float32) * alpha
    return np.round(image).astype(np.uint8)


def render_scene(rng: np.random.Generator, kind: str | None = None, held_out: bool = False) -> tuple[np.ndarray, str]:
    """One random scene: image uint8 (64, 64, 3) and its caption; kind None draws one of KINDS uniformly."""
    objs, caption = sample_scene(rng, kind, held_out)
    return render(objs), caption


def scene_at(seed: int, index: int, split: str = "train") -> tuple[np.ndarray, str]:
    """Scene number `index` of the stream `seed`: independent of every other index, so any position resumes."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    return render_scene(np.random.default_rng([seed, index]), held_out=split == "held_out")


def _scene_range(args: tuple[int, int, int, str]) -> list[tuple[np.ndarray, str]]:
    seed, start, stop, split = args
    return [scene_at(seed, i, split) for i in range(start, stop)]


def sample_batch(n: int, seed: int, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """The first n scenes of the stream: images uint8 (n, 64, 64, 3) and captions. Large n renders on every
    core (each scene is seeded by its index, so the result does not depend on the number of processes)."""
    procs = min(os.cpu_count() or 1, n // 2000)
    if procs > 1:
        import multiprocessing

        bounds = np.linspace(0, n, procs * 4 + 1).astype(int)
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            parts = pool.map(_scene_range, [(seed, a, b, split) for a, b in zip(bounds[:-1], bounds[1:])])
        scenes = [s for part in parts for s in part]
    else:
        scenes = _scene_range((seed, 0, n, split))
    return np.stack([im for im, _ in scenes]), [c for _, c in scenes]


def eval_fixed_captions() -> list[str]:
    """The captions `latentdiff eval shapes` scores: 8 per kind, held-in then held-out (fixed forever)."""
    rng = np.random.default_rng(EVAL_SEED)
    captions = []
    for held_out in (False, True):
        for kind in KINDS:
            picked: list[str] = []
            while len(picked) < EVAL_PER_KIND:
                caption = sample_scene(rng, kind, held_out)[1]
                if caption not in picked:
                    picked.append(caption)
            captions += picked
    return captions


# ------------------------------------------------------------------------------------------------ checker

def find_objects(image: np.ndarray) -> list[Obj]:
    """Segment palette colours, split into 8-connected blobs, and fit the best shape template to each blob."""
    ink = 255.0 - image.astype(np.float32)  # (64, 64, 3): 0 on white
    dirs = 255.0 - np.array(list(PALETTE.values()), dtype=np.float32)  # (7, 3): white -> colour
    alpha = ink @ dirs.T / (dirs**2).sum(1)  # (64, 64, 7): how far along each white-to-colour line
    resid = np.linalg.norm(ink[:, :, None, :] - alpha[..., None] * dirs, axis=-1)  # (64, 64, 7)
    label = resid.argmin(-1)  # (64, 64) nearest colour line
    own_alpha = np.take_along_axis(alpha, label[..., None], -1)[..., 0]
    core = (own_alpha > CORE_ALPHA) & (own_alpha < 1.5) & (resid.min(-1) < COLOR_TOL)

    blobs = [b for b in _components(core, label) if len(b) >= MIN_PIXELS]
    in_blob = np.full(core.shape, -1)
    for k, blob in enumerate(blobs):
        in_blob[tuple(np.array(blob).T)] = k
    objs = []
    for k, blob in enumerate(blobs):
        ys, xs = np.array(blob).T
        c = int(label[ys[0], xs[0]])
        # Soft coverage around the blob: its own colour, not another blob's core pixels.
        box = (max(xs.min() - 2, 0), max(ys.min() - 2, 0), min(xs.max() + 3, IMAGE), min(ys.max() + 3, IMAGE))
        win = np.s_[box[1]:box[3], box[0]:box[2]]
        mine = (label[win] == c) & np.isin(in_blob[win], (-1, k))
        soft = np.where(mine, np.clip(alpha[win][..., c], 0, 1), 0.0)
        objs.append(_fit_shape(list(PALETTE)[c], soft, box))
    return objs


def _components(mask: np.ndarray, label: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of mask whose pixels share a colour label (flood fill; a few hundred pixels)."""
    seen = np.zeros_like(mask)
    blobs = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        blob, stack = [], [start]
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < IMAGE and 0 <= nx < IMAGE and mask[ny, nx] and not seen[ny, nx] \
                            and label[ny, nx] == label[y, x]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        blobs.append(blob)
    return blobs


def _fit_shape(color: str, soft: np.ndarray, box: tuple[int, int, int, int]) -> Obj:
    """Best of the four shapes by IoU of its coverage template, sized by area and placed by centroid."""
    area = float(soft.sum())
    ys, xs = np.mgrid[box[1]:box[3], box[0]:box[2]] + 0.5  # pixel centres
    mx, my = float((soft * xs).sum() / area), float((soft * ys).sum() / area)
    best = None
    for shape in SHAPES:
        s = math.sqrt(area / AREA[shape])
        # A triangle's centroid sits h/6 = s*sqrt(3)/6 below the centre of its box.
        cy = my - s * math.sqrt(3) / 6 if shape == "triangle" else my
        t = coverage(shape, mx, cy, s, box)
        iou = float(np.minimum(t, soft).sum() / np.maximum(t, soft).sum())
        if best is None or iou > best[0]:
            best = (iou, Obj(color, shape, s, mx, cy))
    return best[1]


def _cell(o: Obj) -> str:
    col, row = (min(max(int(v // CELL), 0), 2) for v in (o.cx, o.cy))
    return POSITIONS[row * 3 + col]


def _size_word(o: Obj) -> str:
    return "small" if o.s < SIZE_SPLIT else "large"


def check(image: np.ndarray, caption: str) -> dict:
    """Score an image (uint8 (64, 64, 3)) against its caption.

    Returns {"kind": str, <attribute>: bool, ..., "correct": bool}; attributes per kind:
    single: count (exactly one object), color, shape, size, position (of the largest object);
    count: count (objects in the image), color, shape, size (of every object);
    relation: count (exactly two objects), color (both named colours present), shape (of each), relation.
    """
    if image.shape != (IMAGE, IMAGE, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (64, 64, 3), got {image.dtype} {image.shape}")
    want = parse_caption(caption)
    objs = find_objects(image)
    kind = want["kind"]
    if kind == "single":
        o = max(objs, key=lambda o: o.s, default=None)
        result = {"count": len(objs) == 1, "color": o is not None and o.color == want["color"],
                  "shape": o is not None and o.shape == want["shape"],
                  "size": o is not None and _size_word(o) == want["size"],
                  "position": o is not None and _cell(o) == want["position"]}
    elif kind == "count":
        result = {"count": len(objs) == want["n"], "color": bool(objs) and all(o.color == want["color"] for o in objs),
                  "shape": bool(objs) and all(o.shape == want["shape"] for o in objs),
                  "size": bool(objs) and all(_size_word(o) == "small" for o in objs)}
    else:
        (c1, sh1), (c2, sh2) = want["first"], want["second"]
        a = max((o for o in objs if o.color == c1), key=lambda o: o.s, default=None)
        b = max((o for o in objs if o.color == c2), key=lambda o: o.s, default=None)
        if a is not None and b is not None:
            along, across = _relation_axes(want["relation"], (a.cx, a.cy), (b.cx, b.cy))
        result = {"count": len(objs) == 2, "color": a is not None and b is not None,
                  "shape": a is not None and b is not None and a.shape == sh1 and b.shape == sh2,
                  "relation": a is not None and b is not None and along >= MIN_RELATION_GAP and abs(across) < along}
    return {"kind": kind, **result, "correct": all(result.values())}
