"""The portrait world: a procedural renderer of anime-style portraits, the studio's embedded data.

Every portrait is drawn from a set of named attributes (:data:`ATTRIBUTES`) and a seed. The seed
sets the pose (rotation, scale, offset), small variations of shape (face width, eye size, hair
locks) and of tone, and the phrasing of the caption; the same (attributes, seed, size) always gives
the same bytes, and the same seed with other attributes keeps the pose. For each portrait the world
returns the colour image, its line art (the very strokes the colour image is outlined with, grouped
in drawing order so a sketch can be replayed progressively), a caption and the labels.

All geometry lives in normalised coordinates (x right, y down, the canvas is [0, 1]^2). A portrait
is built in a *head frame*, hidden parts of each outline are removed against the shapes painted
over it, and the pose transform is applied last; shapes are filled with PIL at ``supersample`` times
the output size and reduced with a box filter, which anti-aliases them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "STROKE_GROUPS",
    "HELD_OUT_COMBINATIONS",
    "PortraitAttributes",
    "Stroke",
    "Portrait",
    "PortraitWorld",
    "is_held_out",
    "measure_render_rate",
    "caption_attributes",
]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair_color": ("black", "brown", "blonde", "red", "blue", "pink", "silver", "green"),
    "hair_style": ("short", "bob", "long", "twintails"),
    "bangs": ("no", "yes"),
    "eye_color": ("brown", "blue", "green", "red", "purple", "gold"),
    "expression": ("neutral", "smile", "laughing", "surprised"),  # laughing: open mouth
    "glasses": ("no", "yes"),
    "accessory": ("none", "ribbon", "hat"),
    "skin_tone": ("fair", "light", "tan", "dark"),
    "background": ("white", "sky", "pink", "mint", "lavender", "peach"),
}

STROKE_GROUPS = ("outline", "eyes", "hair", "details")  # drawing order of the progressive sketch

# Attribute pairs never drawn for the "train" split: generalisation is measured on them. Each pair
# joins attributes drawn in different places of the portrait and no binary attribute, so that no
# value of one is ever implied by the other in training (that would invite shortcut learning).
HELD_OUT_COMBINATIONS: tuple[dict[str, str], ...] = (
    {"hair_color": "green", "hair_style": "twintails"},
    {"hair_color": "blue", "glasses": "yes"},
    {"eye_color": "gold", "expression": "surprised"},
    {"hair_color": "pink", "eye_color": "green"},
    {"hair_style": "bob", "background": "mint"},
    {"skin_tone": "dark", "background": "lavender"},
    {"accessory": "ribbon", "eye_color": "blue"},
    {"eye_color": "red", "expression": "laughing"},
)

SPLITS = ("train", "heldout", "any")


# --------------------------------------------------------------------------------------------
# attributes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PortraitAttributes:
    """One value per :data:`ATTRIBUTES` entry, validated on construction."""

    hair_color: str
    hair_style: str
    bangs: str
    eye_color: str
    expression: str
    glasses: str
    accessory: str
    skin_tone: str
    background: str

    def __post_init__(self) -> None:
        for name, allowed in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown value {value!r} for attribute {name!r}; "
                                 f"allowed values: {', '.join(allowed)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> "PortraitAttributes":
        """Build from a complete ``{name: value}`` mapping (ValueError on anything missing or unknown)."""
        unknown = [k for k in d if k not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attribute name(s) {', '.join(map(repr, unknown))}; "
                             f"allowed names: {', '.join(ATTRIBUTES)}")
        missing = [k for k in ATTRIBUTES if k not in d]
        if missing:
            raise ValueError(f"missing attribute(s): {', '.join(missing)}")
        return cls(**{k: d[k] for k in ATTRIBUTES})

    @classmethod
    def from_indices(cls, indices: Mapping[str, int] | Sequence[int]) -> "PortraitAttributes":
        """Inverse of :meth:`to_indices` (also accepts a sequence in :data:`ATTRIBUTES` order)."""
        if not isinstance(indices, Mapping):
            if len(indices) != len(ATTRIBUTES):
                raise ValueError(f"expected {len(ATTRIBUTES)} indices, got {len(indices)}")
            indices = dict(zip(ATTRIBUTES, indices))
        out = {}
        for name, i in indices.items():
            if name not in ATTRIBUTES:
                raise ValueError(f"unknown attribute name {name!r}; allowed names: {', '.join(ATTRIBUTES)}")
            if not 0 <= int(i) < len(ATTRIBUTES[name]):
                raise ValueError(f"index {i} out of range for {name!r} ({len(ATTRIBUTES[name])} values)")
            out[name] = ATTRIBUTES[name][int(i)]
        return cls.from_dict(out)

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_indices(self) -> dict[str, int]:
        """Index of each value in ``ATTRIBUTES[name]``."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}

    def replace(self, **changes: str) -> "PortraitAttributes":
        """A copy with some values changed (validated like :meth:`from_dict`)."""
        d = self.to_dict()
        unknown = [k for k in changes if k not in ATTRIBUTES]
        if unknown:
            raise ValueError(f"unknown attribute name(s) {', '.join(map(repr, unknown))}; "
                             f"allowed names: {', '.join(ATTRIBUTES)}")
        d.update(changes)
        return PortraitAttributes.from_dict(d)


def _as_attributes(attributes: PortraitAttributes | Mapping[str, str]) -> PortraitAttributes:
    if isinstance(attributes, PortraitAttributes):
        return attributes
    if isinstance(attributes, Mapping):
        return PortraitAttributes.from_dict(attributes)
    raise TypeError(f"attributes must be PortraitAttributes or a mapping, got {type(attributes).__name__}")


def is_held_out(attributes: PortraitAttributes | Mapping[str, str]) -> bool:
    """Whether the attributes contain one of :data:`HELD_OUT_COMBINATIONS`."""
    d = _as_attributes(attributes).to_dict()
    return any(all(d[k] == v for k, v in combo.items()) for combo in HELD_OUT_COMBINATIONS)


@dataclass
class Stroke:
    """One line of the line art."""

    group: str          # one of STROKE_GROUPS
    points: np.ndarray  # [N, 2] float32, normalised (x right, y down), pose included
    width: float        # line width as a fraction of the image size
    closed: bool


@dataclass
class Portrait:
    image: Image.Image      # RGB, size x size
    line_art: Image.Image | None  # "L", white background, black lines, same geometry (None if not asked for)
    strokes: list[Stroke]   # in drawing order: outline, eyes, hair, details
    caption: str
    attributes: PortraitAttributes
    seed: int


# --------------------------------------------------------------------------------------------
# palettes (RGB); tones are jittered a little per seed, never enough to cross into another value
# --------------------------------------------------------------------------------------------

_HAIR = {
    "black": (50, 46, 62), "brown": (132, 84, 50), "blonde": (246, 212, 116), "red": (214, 56, 48),
    "blue": (60, 104, 216), "pink": (246, 142, 190), "silver": (196, 202, 214), "green": (56, 166, 100),
}
_EYE = {
    "brown": (150, 84, 40), "blue": (48, 116, 236), "green": (36, 170, 86), "red": (226, 40, 52),
    "purple": (150, 72, 218), "gold": (242, 182, 30),
}
_SKIN = {"fair": (255, 238, 228), "light": (248, 212, 180), "tan": (212, 154, 106), "dark": (138, 90, 62)}
_BACKGROUND = {
    "white": (250, 250, 250), "sky": (178, 218, 250), "pink": (250, 210, 226), "mint": (192, 240, 214),
    "lavender": (220, 206, 248), "peach": (255, 216, 186),
}
_CLOTHES = ((52, 62, 104), (238, 238, 244), (48, 48, 58), (128, 44, 64), (150, 154, 166), (214, 196, 160),
            (50, 92, 74))
_ACCENTS = ((220, 48, 72), (250, 250, 252), (40, 56, 120), (250, 200, 40), (40, 40, 48), (120, 200, 230),
            (150, 90, 200))
_HATS = ((236, 214, 156), (250, 250, 250), (40, 52, 110), (170, 40, 60), (40, 38, 44), (236, 130, 40),
         (30, 130, 140), (110, 60, 150))
_FRAMES = ((36, 34, 44), (120, 36, 40), (70, 50, 40), (50, 60, 120))
_EYE_LINE = (38, 26, 34)
_MOUTH = (132, 36, 48)
_TONGUE = (236, 120, 130)
_WHITE = (255, 255, 255)


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[int, int, int]:
    return tuple(int(round(a[i] * (1 - t) + b[i] * t)) for i in range(3))


def _scale(c: Sequence[float], f: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, round(v * f)))) for v in c)


def _far_from(palette: Sequence[tuple[int, int, int]], avoid: Sequence[Sequence[int]], u: float,
              distance: int = 150) -> tuple[int, int, int]:
    """A palette colour picked by ``u`` among those farther than ``distance`` (L1) from every ``avoid``."""
    def gap(c: Sequence[int]) -> int:
        return min(sum(abs(c[i] - a[i]) for i in range(3)) for a in avoid)
    ok = [c for c in palette if gap(c) > distance] or [max(palette, key=gap)]
    return ok[min(int(u * len(ok)), len(ok) - 1)]


# --------------------------------------------------------------------------------------------
# geometry helpers (all numpy, float64, head frame)
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _cr_basis(n: int) -> np.ndarray:
    """Catmull-Rom basis, [n, 4], for n samples per segment."""
    t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
    t2, t3 = t * t, t * t * t
    return 0.5 * np.hstack([-t3 + 2 * t2 - t, 3 * t3 - 5 * t2 + 2, -3 * t3 + 4 * t2 + t, t3 - t2])


def _spline(ctrl: Sequence[Sequence[float]] | np.ndarray, n: int = 6, closed: bool = False) -> np.ndarray:
    """Catmull-Rom curve through the control points; ``n`` samples per segment."""
    p = np.asarray(ctrl, dtype=np.float64)
    if closed:
        pp = np.concatenate([p[-1:], p, p[:2]])
        m = len(p)
    else:
        pp = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
        m = len(p) - 1
    idx = np.arange(m)[:, None] + np.arange(4)[None, :]
    out = np.matmul(_cr_basis(n)[None], pp[idx]).reshape(-1, 2)
    return out if closed else np.concatenate([out, p[-1:]])


@lru_cache(maxsize=None)
def _bez_basis(n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return np.hstack([(1 - t) ** 2, 2 * t * (1 - t), t * t])


def _qbez(a: Sequence[float], c: Sequence[float], b: Sequence[float], n: int = 6) -> np.ndarray:
    """Quadratic Bezier a -> b with control c, n samples including both ends."""
    return _bez_basis(n) @ np.array([a, c, b], dtype=np.float64)


@lru_cache(maxsize=None)
def _unit_arc(a0: float, a1: float, n: int) -> np.ndarray:
    a = np.linspace(a0, a1, n)
    return np.stack([np.cos(a), np.sin(a)], 1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24,
             a0: float = 0.0, a1: float = 2 * math.pi, endpoint: bool = False) -> np.ndarray:
    """Points on an ellipse (angles in radians, y down: a = pi/2 is the bottom)."""
    u = _unit_arc(a0, a1, n + (0 if endpoint else 1))
    if not endpoint:
        u = u[:-1]
    return u * (rx, ry) + (cx, cy)


def _mirror(pts: np.ndarray, cx: float = 0.5) -> np.ndarray:
    """Mirror about x = cx, reversing the point order (so a left outline continues a right one)."""
    out = pts[::-1].copy()
    out[:, 0] = 2 * cx - out[:, 0]
    return out


class _Occluder:
    """A polygon prepared for repeated even-odd point-in-polygon tests."""

    def __init__(self, poly: np.ndarray) -> None:
        self.lo, self.hi = poly.min(0), poly.max(0)
        self.x1, self.y1 = poly[:, 0], poly[:, 1]
        self.y2 = np.concatenate([self.y1[1:], self.y1[:1]])
        dy = self.y2 - self.y1
        dy[dy == 0] = 1e-12
        self.slope = (np.concatenate([self.x1[1:], self.x1[:1]]) - self.x1) / dy

    def inside(self, pts: np.ndarray) -> np.ndarray:
        """[M] bool for [M, 2] points."""
        out = ((pts >= self.lo) & (pts <= self.hi)).all(1)
        if out.any():
            cand = pts[out]
            x, y = cand[:, :1], cand[:, 1:2]
            cond = (self.y1 > y) != (self.y2 > y)
            xint = self.x1 + (y - self.y1) * self.slope
            out[out] = (cond & (x < xint)).sum(1) % 2 == 1
        return out


def _densify(pts: np.ndarray, closed: bool, step: float = 0.008) -> np.ndarray:
    """Insert points so that no segment is longer than ``step``."""
    p = np.concatenate([pts, pts[:1]]) if closed else pts
    seg = np.diff(p, axis=0)
    k = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step).astype(np.int64))
    if (k == 1).all():
        return pts
    idx = np.repeat(np.arange(len(seg)), k)
    starts = np.cumsum(k) - k
    t = (np.arange(int(k.sum())) - np.repeat(starts, k)) / np.repeat(k, k)
    out = p[idx] + seg[idx] * t[:, None]
    return out if closed else np.concatenate([out, p[-1:]])


def _visible_runs(pts: np.ndarray, closed: bool, occluders: Sequence[_Occluder]) -> list[tuple[np.ndarray, bool]]:
    """Split a polyline into the runs not covered by any occluder polygon."""
    lo, hi = pts.min(0), pts.max(0)
    occluders = [o for o in occluders if not ((o.lo > hi).any() or (o.hi < lo).any())]
    if not occluders:
        return [(pts, closed)]
    pts = _densify(pts, closed)
    hidden = occluders[0].inside(pts)
    for o in occluders[1:]:
        hidden |= o.inside(pts)
    return _runs(pts, closed, hidden)


def _runs(pts: np.ndarray, closed: bool, hidden: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """The runs of consecutive points that are not ``hidden`` (each at least 2 points long)."""
    if not hidden.any():
        return [(pts, closed)]
    if hidden.all():
        return []
    if closed:  # start the walk at a hidden point so runs do not wrap around
        k = int(np.argmax(hidden))
        pts, hidden = np.roll(pts, -k, 0), np.roll(hidden, -k)
    vis = ~hidden
    edges = np.flatnonzero(np.diff(np.concatenate([[False], vis, [False]]).astype(np.int8)))
    return [(pts[a:b], False) for a, b in zip(edges[::2], edges[1::2]) if b - a >= 2]


# --------------------------------------------------------------------------------------------
# scene: fills and outlines in painter order, built in the head frame
# --------------------------------------------------------------------------------------------

_GROUP_INDEX = {g: i for i, g in enumerate(STROKE_GROUPS)}


class _Scene:
    def __init__(self) -> None:
        self.ops: list[tuple] = []                 # ("fill", pts, colour) | ("line", stroke_index, colour)
        self.strokes: list[tuple[str, np.ndarray, float, bool]] = []
        self.posed_index: list[tuple[str, np.ndarray, float, bool]] = []   # strokes after the pose
        self._occluders: dict[int, tuple[np.ndarray, _Occluder]] = {}

    def _prepared(self, polys: Sequence[np.ndarray]) -> list[_Occluder]:
        out = []
        for poly in polys:
            hit = self._occluders.get(id(poly))
            if hit is None or hit[0] is not poly:
                hit = self._occluders[id(poly)] = (poly, _Occluder(poly))
            out.append(hit[1])
        return out

    def fill(self, pts: np.ndarray, colour: tuple[int, int, int]) -> None:
        self.ops.append(("fill", pts, colour))

    def line(self, group: str, pts: np.ndarray, width: float, colour: tuple[int, int, int],
             closed: bool = False, occluders: Sequence[np.ndarray] = ()) -> None:
        for run, run_closed in _visible_runs(pts, closed, self._prepared(occluders)):
            self.ops.append(("line", len(self.strokes), colour))
            self.strokes.append((group, run, width, run_closed))

    def shape(self, group: str, pts: np.ndarray, fill: tuple[int, int, int], width: float,
              colour: tuple[int, int, int], occluders: Sequence[np.ndarray] = ()) -> None:
        """A filled closed shape outlined by its (visible) boundary."""
        self.fill(pts, fill)
        self.line(group, pts, width, colour, closed=True, occluders=occluders)


# --------------------------------------------------------------------------------------------
# rasterising
# --------------------------------------------------------------------------------------------

_MIN_LINE_PX = 0.8  # thinnest line, in output pixels, so line art stays visible at 64 px


def _line_px(width: float, size: int, ss: int) -> int:
    return max(1, int(round(max(width * size, _MIN_LINE_PX) * ss)))


def _draw_polyline(draw: ImageDraw.ImageDraw, pts: np.ndarray, closed: bool, width_px: int, fill, s: float) -> None:
    p = pts * s
    if closed:
        p = np.concatenate([p, p[:1]])
    draw.line(p.ravel().tolist(), fill=fill, width=width_px, joint="curve" if width_px > 2 else None)
    if width_px > 3 and not closed:  # round caps
        r = width_px / 2.0 - 0.5
        for x, y in (p[0], p[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


@lru_cache(maxsize=64)
def _gradient(top: tuple[int, int, int], bottom: tuple[int, int, int], side: int) -> Image.Image:
    t = np.linspace(0.0, 1.0, side)[:, None]
    col = (np.array(top)[None] * (1 - t) + np.array(bottom)[None] * t).round().astype(np.uint8)  # [side, 3]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(col[:, None, :], (side, side, 3))), "RGB")


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------

_HAIR_WORDS = {
    "black": ("black", "jet-black", "raven-black"), "brown": ("brown", "chestnut"), "blonde": ("blonde", "golden"),
    "red": ("red", "crimson"), "blue": ("blue", "azure"), "pink": ("pink", "rose-pink"),
    "silver": ("silver", "silvery"), "green": ("green", "emerald"),
}
_EYE_WORDS = {
    "brown": ("brown", "hazel"), "blue": ("blue", "sapphire"), "green": ("green", "jade"), "red": ("red", "ruby"),
    "purple": ("purple", "violet"), "gold": ("gold", "golden", "amber"),
}
_SKIN_WORDS = {"fair": ("fair", "pale"), "light": ("light",), "tan": ("tan", "tanned"), "dark": ("dark", "deep brown")}
_BG_WORDS = {
    "white": ("white", "plain white"), "sky": ("sky-blue", "pale blue"), "pink": ("pink", "soft pink"),
    "mint": ("mint", "mint-green"), "lavender": ("lavender",), "peach": ("peach", "peach-coloured"),
}
_STYLE_PHRASES = {  # {c}: a hair colour word
    "short": ("short {c} hair", "{c} hair cut short", "{c} hair in a short cut"),
    "bob": ("{c} hair in a bob", "a {c} bob", "a chin-length {c} bob", "bobbed {c} hair"),
    "long": ("long {c} hair", "{c} hair falling past the shoulders", "long flowing {c} hair"),
    "twintails": ("{c} twintails", "{c} hair in twintails", "{c} hair tied in twin tails", "{c} pigtails"),
}
_STYLE_TAGS = {"short": ("short hair",), "bob": ("bob cut",), "long": ("long hair",),
               "twintails": ("twintails", "twin tails")}
# per attribute value: ("with" phrases, free phrases, tags)
_PHRASES: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]] = {
    "bangs": {"yes": (("bangs", "a fringe", "wispy bangs"), (), ("bangs",)),
              "no": (("no bangs", "a bare forehead"), ("without bangs",), ("no bangs",))},
    "expression": {
        "neutral": (("a neutral expression", "a calm expression", "a calm face"), (), ("neutral expression",)),
        "smile": (("a gentle smile", "a soft smile", "a smile"), ("smiling",), ("smile", "smiling")),
        "laughing": (("an open-mouthed laugh", "a big laugh"), ("laughing", "laughing with an open mouth"),
                     ("laughing",)),
        "surprised": (("a surprised look", "a surprised face"), ("surprised", "looking surprised"), ("surprised",)),
    },
    "glasses": {"yes": (("glasses", "round glasses", "specs"), ("wearing glasses", "wearing specs"), ("glasses",)),
                "no": (("no glasses",), ("without glasses",), ("no glasses",))},
    "accessory": {
        "ribbon": (("a ribbon in her hair", "a hair ribbon", "a hair bow"), ("wearing a ribbon",), ("hair ribbon",)),
        "hat": (("a hat", "a sun hat", "a wide-brimmed hat"), ("wearing a hat", "wearing a sun hat"), ("hat",)),
        "none": (("no accessories",), ("without accessories", "without a hat or ribbon"), ("no accessories",)),
    },
}
_SUBJECTS = ("an anime girl", "a girl", "an anime character", "a young woman", "a character")
# probability of mentioning each optional attribute, by value (hair colour and style: always)
_MENTION = {
    "bangs": {"yes": 0.55, "no": 0.4},
    "eye_color": 0.7,
    "expression": {"neutral": 0.45, "smile": 0.75, "laughing": 0.8, "surprised": 0.8},
    "glasses": {"yes": 0.92, "no": 0.12},
    "accessory": {"none": 0.1, "ribbon": 0.92, "hat": 0.92},
    "skin_tone": 0.5,
    "background": 0.6,
}


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _compose_caption(attrs: PortraitAttributes, rng: np.random.Generator) -> tuple[str, dict[str, str]]:
    """A caption and the attributes it mentions."""
    a = attrs.to_dict()
    mentioned = {"hair_color": a["hair_color"], "hair_style": a["hair_style"]}
    for name, p in _MENTION.items():
        prob = p[a[name]] if isinstance(p, dict) else p
        if rng.random() < prob:
            mentioned[name] = a[name]
    tag_style = rng.random() < 0.25
    colour_word = _pick(rng, _HAIR_WORDS[a["hair_color"]])
    withs: list[str] = []
    frees: list[str] = []
    tags: list[str] = []
    if tag_style:
        tags += [f"{colour_word} hair", _pick(rng, _STYLE_TAGS[a["hair_style"]])]
    else:
        withs.append(_pick(rng, _STYLE_PHRASES[a["hair_style"]]).format(c=colour_word))
    for name in mentioned:
        if name in ("hair_color", "hair_style"):
            continue
        value = mentioned[name]
        if name == "eye_color":
            phrase = f"{_pick(rng, _EYE_WORDS[value])} eyes"
            (tags if tag_style else withs).append(phrase)
        elif name == "skin_tone":
            phrase = f"{_pick(rng, _SKIN_WORDS[value])} skin"
            (tags if tag_style else withs).append(phrase)
        elif name == "background":
            word = _pick(rng, _BG_WORDS[value])
            if tag_style:
                tags.append(f"{word} background")
            else:
                frees.append(_pick(rng, (f"on a {word} background", f"against a {word} backdrop",
                                         f"in front of a {word} background")))
        else:
            with_p, free_p, tag_p = _PHRASES[name][value]
            if tag_style:
                tags.append(_pick(rng, tag_p))
            elif free_p and (rng.random() < 0.4 or not with_p):
                frees.append(_pick(rng, free_p))
            else:
                withs.append(_pick(rng, with_p))
    subject = _pick(rng, _SUBJECTS)
    if tag_style:
        order = rng.permutation(len(tags))
        head = _pick(rng, ("anime girl", "anime portrait", "1girl, portrait", "portrait of an anime girl"))
        return re.sub(r"\ba (?=[aeiou])", "an ", ", ".join([head] + [tags[i] for i in order])), mentioned
    withs = [withs[i] for i in rng.permutation(len(withs))]
    frees = [frees[i] for i in rng.permutation(len(frees))]
    template = int(rng.integers(5))
    with_text = _join(withs)
    free_text = ", ".join(frees)
    if template == 0:
        text = f"{subject} with {with_text}"
        text += f", {free_text}" if frees else ""
    elif template == 1:
        text = f"an anime-style portrait of {subject} with {with_text}"
        text += f", {free_text}" if frees else ""
    elif template == 2:
        text = f"{subject}" + (f", {free_text}," if frees else "") + f" with {with_text}"
    elif template == 3:
        text = f"a drawing of {subject} who has {with_text}"
        text += f"; {free_text}" if frees else ""
    else:
        text = f"close-up of {subject} with {with_text}"
        text += f", {free_text}" if frees else ""
    text = re.sub(r"\ba (?=[aeiou])", "an ", text)
    return text[0].upper() + text[1:], mentioned


def _alternation(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _value_regex(table: Mapping[str, Sequence[str]], following: str) -> tuple[re.Pattern, dict[str, str]]:
    lookup = {w: v for v, ws in table.items() for w in ws}
    return re.compile(rf"(?<![\w-])({_alternation(lookup)})(?=\s+(?:{following})\b)"), lookup


_HAIR_NOUNS = r"hair|bob|twintails|twin tails|pigtails"
_RE_HAIR, _HAIR_LOOKUP = _value_regex(_HAIR_WORDS, _HAIR_NOUNS)
_RE_EYE, _EYE_LOOKUP = _value_regex(_EYE_WORDS, r"eyes")
_RE_SKIN, _SKIN_LOOKUP = _value_regex(_SKIN_WORDS, r"skin")
_RE_BG, _BG_LOOKUP = _value_regex(_BG_WORDS, r"background|backdrop")
# (attribute, value, pattern) in matching order; a negative phrase is removed before the positive
# patterns of its attribute are tried, so "without glasses" is never read as "glasses".
_RULES: tuple[tuple[str, str, re.Pattern], ...] = tuple(
    (name, value, re.compile(pattern)) for name, value, pattern in (
        ("hair_style", "twintails", r"\btwin-?tails\b|\btwin tails\b|\bpigtails\b"),
        ("hair_style", "bob", r"\bbob(?:bed)?\b|\bbob cut\b"),
        ("hair_style", "long", r"\blong\b|\bpast the shoulders\b"),
        ("hair_style", "short", r"\bshort\b"),
        ("bangs", "no", r"\b(?:no|without) bangs\b|\bbare forehead\b|\bno fringe\b"),
        ("bangs", "yes", r"\bbangs\b|\bfringe\b"),
        ("glasses", "no", r"\b(?:no|without) (?:glasses|specs)\b"),
        ("glasses", "yes", r"\bglasses\b|\bspecs\b|\bspectacles\b"),
        ("accessory", "none", r"\bno accessories\b|\bwithout accessories\b|\bwithout a hat or ribbon\b"),
        ("accessory", "hat", r"\bhat\b"),
        ("accessory", "ribbon", r"\bribbon\b|\bhair bow\b|\bbow\b"),
        ("expression", "laughing", r"\blaugh(?:ing)?\b"),
        ("expression", "surprised", r"\bsurprised\b"),
        ("expression", "smile", r"\bsmil(?:e|ing)\b"),
        ("expression", "neutral", r"\bneutral expression\b|\bcalm (?:expression|face)\b|\bneutral\b"),
    ))


def caption_attributes(caption: str) -> dict[str, str]:
    """The attributes a caption mentions, ``{name: value}`` (inverse of the caption generator)."""
    text = " ".join(caption.lower().split())
    found: dict[str, str] = {}
    for name, pattern, lookup in (("hair_color", _RE_HAIR, _HAIR_LOOKUP), ("eye_color", _RE_EYE, _EYE_LOOKUP),
                                  ("skin_tone", _RE_SKIN, _SKIN_LOOKUP), ("background", _RE_BG, _BG_LOOKUP)):
        m = pattern.search(text)
        if m:
            found[name] = lookup[m.group(1)]
            text = text[:m.start()] + "#" * (m.end() - m.start()) + text[m.end():]
    for name, value, pattern in _RULES:
        if name in found:
            continue
        m = pattern.search(text)
        if m:
            found[name] = value
            text = pattern.sub(lambda mm: "#" * len(mm.group(0)), text)
    return {name: found[name] for name in ATTRIBUTES if name in found}


# --------------------------------------------------------------------------------------------
# the world
# --------------------------------------------------------------------------------------------

_NUM_U = 64  # uniforms drawn per seed, in a fixed order, whatever the attributes


class PortraitWorld:
    """Renders anime-style portraits from attributes and a seed (see the module docstring)."""

    MIN_SIZE = 64
    MAX_SIZE = 512

    def __init__(self, *, supersample: int = 4) -> None:
        if not isinstance(supersample, int) or not 1 <= supersample <= 8:
            raise ValueError(f"supersample must be an integer in 1..8, got {supersample!r}")
        self.supersample = supersample

    # -- attributes ------------------------------------------------------------------------
    def sample_attributes(self, rng: np.random.Generator, *, split: str = "train") -> PortraitAttributes:
        """Uniform attributes; "train" never gives a held-out combination, "heldout" only those."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        while True:
            attrs = PortraitAttributes(**{name: values[int(rng.integers(len(values)))]
                                          for name, values in ATTRIBUTES.items()})
            held = is_held_out(attrs)
            if split == "any" or held == (split == "heldout"):
                return attrs

    def sample(self, seed: int, *, size: int = 128, split: str = "train",
               with_line_art: bool = True) -> Portrait:
        """A portrait whose attributes are drawn from ``seed`` too."""
        _check_seed(seed)
        attrs = self.sample_attributes(np.random.default_rng([seed, 1]), split=split)
        return self.render(attrs, seed=seed, size=size, with_line_art=with_line_art)

    def caption(self, attributes: PortraitAttributes, rng: np.random.Generator) -> str:
        """A natural-language caption; it always names hair colour and style."""
        return _compose_caption(_as_attributes(attributes), rng)[0]

    # -- rendering -------------------------------------------------------------------------
    def render(self, attributes: PortraitAttributes | Mapping[str, str], *, seed: int, size: int = 128,
               with_line_art: bool = True) -> Portrait:
        """Draw one portrait; deterministic in (attributes, seed, size)."""
        attrs = _as_attributes(attributes)
        _check_seed(seed)
        _check_size(size)
        u = np.random.default_rng(seed).random(_NUM_U)
        scene, bg = _build_scene(attrs, u)
        strokes = _posed_strokes(scene, u)
        image = self._raster_colour(scene, bg, size)
        line_art = self.render_sketch(strokes, size=size) if with_line_art else None
        caption = self.caption(attrs, np.random.default_rng([seed, 2]))
        return Portrait(image=image, line_art=line_art, strokes=strokes, caption=caption,
                        attributes=attrs, seed=seed)

    def stroke_box(self, seed: int, *, split: str = "train", group: str = "eyes") -> tuple[float, float, float, float]:
        """Bounding box ``(x0, y0, x1, y1)``, normalised like the strokes (pose included), of the strokes
        of ``group`` in ``sample(seed, split=split)``: the same geometry, without rasterising anything.
        ``"eyes"`` covers both eyes with their lashes and brows (where a 64 px render keeps eye colour)."""
        _check_seed(seed)
        if group not in STROKE_GROUPS:
            raise ValueError(f"group must be one of {STROKE_GROUPS}, got {group!r}")
        attrs = self.sample_attributes(np.random.default_rng([seed, 1]), split=split)
        u = np.random.default_rng(seed).random(_NUM_U)
        scene, _ = _build_scene(attrs, u)
        points = np.concatenate([st.points for st in _posed_strokes(scene, u) if st.group == group])
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    def render_sketch(self, strokes: Sequence[Stroke], *, size: int, fraction: float = 1.0) -> Image.Image:
        """The first ``round(fraction * len(strokes))`` strokes, black on white ("L")."""
        _check_size(size)
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        ss = self.supersample
        side = size * ss
        img = Image.new("L", (side, side), 255)
        draw = ImageDraw.Draw(img)
        for st in strokes[:int(round(float(fraction) * len(strokes)))]:
            _draw_polyline(draw, np.asarray(st.points, dtype=np.float64), st.closed,
                           _line_px(st.width, size, ss), 0, side)
        return img.reduce(ss) if ss > 1 else img

    def _raster_colour(self, scene: _Scene, bg: tuple, size: int) -> Image.Image:
        ss = self.supersample
        side = size * ss
        img = _gradient(bg[0], bg[1], side).copy()
        draw = ImageDraw.Draw(img)
        lookup = scene.posed_index
        for op in scene.ops:
            if op[0] == "fill":
                draw.polygon((op[1] * side).ravel().tolist(), fill=op[2])
            else:
                _, pts, width, closed = lookup[op[1]]
                _draw_polyline(draw, pts, closed, _line_px(width, size, ss), op[2], side)
        return img.reduce(ss) if ss > 1 else img


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise ValueError(f"size must be an int, got {type(size).__name__}")
    if not PortraitWorld.MIN_SIZE <= size <= PortraitWorld.MAX_SIZE:
        raise ValueError(f"size must be between {PortraitWorld.MIN_SIZE} and {PortraitWorld.MAX_SIZE} pixels, "
                         f"got {size}")


def _pose(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity transform of the seed: rotation ±6°, scale ±6 %, offset ±4 % about the face."""
    angle = math.radians((2 * u[0] - 1) * 6.0)
    s = 1.0 + (2 * u[1] - 1) * 0.06
    off = (np.array([u[2], u[3]]) * 2 - 1) * 0.04
    c, si = math.cos(angle) * s, math.sin(angle) * s
    m = np.array([[c, si], [-si, c]])  # row-vector convention: p @ m
    centre = np.array([0.5, 0.56])
    return m, centre + off - centre @ m


def _posed_strokes(scene: _Scene, u: np.ndarray) -> list[Stroke]:
    """Apply the pose to every shape; returns the strokes cut to the canvas, sorted by group (stable).

    The colour image is outlined with the uncut strokes (``scene.posed_index``); inside the canvas
    they are the same lines.
    """
    m, t = _pose(u)
    scene.ops = [(op[0], op[1] @ m + t, op[2]) if op[0] == "fill" else op for op in scene.ops]
    posed = [(g, p @ m + t, w, c) for g, p, w, c in scene.strokes]
    scene.posed_index = posed
    out: list[Stroke] = []
    for i in sorted(range(len(posed)), key=lambda i: _GROUP_INDEX[posed[i][0]]):
        g, p, w, c = posed[i]
        if p.min() < 0.0 or p.max() > 1.0:
            p = _densify(p, c, 0.01)
            runs = _runs(p, c, ((p < 0.0) | (p > 1.0)).any(1))
        else:
            runs = [(p, c)]
        out += [Stroke(group=g, points=r.astype(np.float32), width=w, closed=rc) for r, rc in runs]
    return out


# --------------------------------------------------------------------------------------------
# the drawing itself (head frame: face centre x = 0.5, eyes near y = 0.55, chin near y = 0.75)
# --------------------------------------------------------------------------------------------

CX = 0.5


def _jit(u: float, amount: float) -> float:
    return (2.0 * u - 1.0) * amount


def _tone(c: Sequence[int], u: float, amount: float = 0.05) -> tuple[int, int, int]:
    return _scale(c, 1.0 + _jit(u, amount))


def _build_scene(a: PortraitAttributes, u: np.ndarray) -> tuple[_Scene, tuple]:
    """All fills and strokes of one portrait, in painter order, in the head frame."""
    sc = _Scene()
    # ---- seeded shape and tone parameters (u[0:4] is the pose) ----
    fw = 1.0 + _jit(u[4], 0.05)            # face width factor
    chin_y = 0.748 + _jit(u[5], 0.012)     # chin tip
    es = 1.0 + _jit(u[6], 0.07)            # eye size factor
    ey = 0.548 + _jit(u[7], 0.008)         # eye line
    sep = 0.098 + _jit(u[8], 0.006)        # half distance between eye centres
    hv = 1.0 + _jit(u[9], 0.035)           # hair volume
    sweep = _jit(u[10], 1.0)               # fringe sweep direction
    part = _jit(u[11], 0.05)               # hair parting offset (no bangs)
    n_locks = 5 + int(u[12] < 0.5)         # fringe locks
    blush = u[13] < 0.5
    clothes = _CLOTHES[int(u[14] * len(_CLOTHES)) % len(_CLOTHES)]

    hair = _tone(_HAIR[a.hair_color], u[15], 0.05)
    hair_shadow = _scale(hair, {"black": 0.62, "blonde": 0.86, "pink": 0.84, "silver": 0.8}.get(a.hair_color, 0.74))
    hair_light = _mix(hair, _WHITE, 0.42 if a.hair_color != "black" else 0.3)
    hair_line = _scale(hair, 0.42) if a.hair_color not in ("black", "brown") else _scale(hair, 0.45)
    if a.hair_color in ("blonde", "silver", "pink"):
        hair_line = _mix(hair_line, (70, 50, 60), 0.3)
    skin = _tone(_SKIN[a.skin_tone], u[16], 0.025)
    skin_shadow = _mix(_scale(skin, 0.86), (200, 80, 90), 0.08)
    skin_line = _mix(_scale(skin, 0.5), (60, 20, 20), 0.25)
    eye = _tone(_EYE[a.eye_color], u[17], 0.05)
    bg_base = _tone(_BACKGROUND[a.background], u[18], 0.015)
    bg = (_mix(bg_base, _WHITE, 0.35), bg_base)
    clothes_line = _scale(clothes, 0.45) if sum(clothes) > 200 else _mix(clothes, (0, 0, 0), 0.55)

    # ---- head-frame shapes ----
    # face: cranium + cheeks + pointed chin
    hw = 0.205 * fw
    left_jaw = _spline([(CX - hw, 0.40), (CX - 0.998 * hw, 0.50), (CX - 0.93 * hw, 0.585),
                        (CX - 0.72 * hw, 0.66), (CX - 0.36 * hw, chin_y - 0.032), (CX, chin_y)], n=5)
    jaw = np.concatenate([left_jaw, _mirror(left_jaw)[1:]])          # left temple -> chin -> right temple
    cranium = _ellipse(CX, 0.40, hw, 0.27, n=20, a0=0.0, a1=-math.pi, endpoint=False)[1:]
    face = np.concatenate([jaw, cranium])

    # hair mass parameters
    hcy = 0.355
    hrx, hry = 0.248 * hv * (0.6 + 0.4 * fw), 0.245 * hv
    if a.hair_style == "short":
        hrx *= 0.975
    top_arc = _ellipse(CX, hcy, hrx, hry, n=24, a0=math.pi, a1=2 * math.pi, endpoint=True)   # left -> right

    style = a.hair_style
    # back hair (painted in the shadow tone) -- left side from the top down to its ends
    lx = CX - hrx
    if style == "bob":
        left_side = np.concatenate([
            _spline([(lx, hcy), (lx - 0.012, 0.47), (lx - 0.016, 0.60), (lx - 0.010, 0.70)], n=4),
            [(lx - 0.004, 0.752), (CX - 0.20, 0.758), (CX - 0.16, 0.748), (CX - 0.045, 0.752)]])
        close_y = 0.62
    elif style == "long":
        left_side = np.concatenate([
            _spline([(lx, hcy), (lx - 0.016, 0.50), (lx - 0.028, 0.68), (lx - 0.04, 0.86)], n=5),
            [(lx - 0.035, 0.99), (lx + 0.02, 0.95), (lx + 0.06, 1.01), (CX - 0.045, 0.98)]])
        close_y = 0.80
    else:  # short / twintails: ends around the ears, two small points
        end = 0.565 if style == "short" else 0.585
        left_side = np.concatenate([
            _spline([(lx, hcy), (lx + 0.006, 0.45), (lx + 0.02, end - 0.05)], n=4),
            [(lx + 0.028, end), (lx + 0.045, end - 0.03), (CX - 0.19, end - 0.005), (CX - 0.16, end - 0.06),
             (CX - 0.045, end - 0.06)]])
        close_y = 0.52
    back_hair = np.concatenate([left_side[::-1], top_arc[1:-1], _mirror(left_side[::-1]),
                                [(CX + 0.045, close_y), (CX - 0.045, close_y)]])

    # twin tails, tied at the upper sides of the head
    tails, tail_shades = [], []
    if style == "twintails":
        w = _jit(u[19], 0.02)
        lt = _spline([(CX - 0.225, 0.255), (CX - 0.30, 0.235), (CX - 0.39, 0.30), (CX - 0.43 - w, 0.45),
                      (CX - 0.415 - w, 0.62), (CX - 0.375, 0.77), (CX - 0.35 + w, 0.89), (CX - 0.315 + w, 0.96)], n=5)
        lt_in = _spline([(CX - 0.315 + w, 0.96), (CX - 0.305, 0.86), (CX - 0.318 - w, 0.72), (CX - 0.305, 0.57),
                         (CX - 0.29, 0.42), (CX - 0.262, 0.32), (CX - 0.225, 0.255)], n=5)[1:-1]
        left_tail = np.concatenate([lt, lt_in])
        taper = np.sin(np.linspace(0.0, math.pi, len(lt_in)))[:, None]
        left_shade = np.concatenate([lt_in, (lt_in + taper * (-0.032, 0.0))[::-1]])
        tail_shades = [left_shade, _mirror(left_shade)]
        tails = [left_tail, _mirror(left_tail)]

    # side locks in front of the face sides
    tip_y = {"short": 0.56, "bob": 0.748, "long": 0.93, "twintails": 0.585}[style] + _jit(u[20], 0.01)
    if style == "long":
        outer = _spline([(lx + 0.004, 0.33), (lx + 0.002, 0.48), (lx - 0.006, 0.64), (lx - 0.004, 0.80),
                         (CX - 0.225, tip_y)], n=5)
        inner = _spline([(CX - 0.225, tip_y), (CX - 0.19, 0.82), (CX - 0.18, 0.68), (CX - 0.185, 0.52),
                         (CX - 0.20, 0.36)], n=5)[1:]
    elif style == "bob":  # straight, square-cut at chin level
        outer = np.concatenate([_spline([(lx + 0.004, 0.33), (lx - 0.004, 0.47), (lx - 0.008, 0.62),
                                         (lx - 0.004, tip_y)], n=5), [(CX - 0.18, tip_y + 0.004)]])
        inner = _spline([(CX - 0.18, tip_y + 0.004), (CX - 0.172, 0.64), (CX - 0.178, 0.50),
                         (CX - 0.20, 0.36)], n=5)[1:]
    else:
        outer = _spline([(lx + 0.006, 0.33), (lx + 0.01, 0.43), (lx + 0.024, tip_y - 0.06),
                         (CX - 0.205, tip_y)], n=5)
        inner = _spline([(CX - 0.205, tip_y), (CX - 0.188, tip_y - 0.08), (CX - 0.188, 0.44),
                         (CX - 0.20, 0.36)], n=5)[1:]
    left_lock = np.concatenate([outer, inner])
    locks = [left_lock, _mirror(left_lock)]

    # front hair: crown + fringe (bangs) or a parted hairline (no bangs)
    front_arc = _ellipse(CX, hcy, hrx * 0.985, hry * 0.985, n=24, a0=math.pi, a1=2 * math.pi, endpoint=True)
    edge_l, edge_r = (CX - hrx * 0.985, hcy + 0.005), (CX + hrx * 0.985, hcy + 0.005)
    strands: list[np.ndarray] = []
    if a.bangs == "yes":
        xs = np.linspace(CX - 0.205, CX + 0.205, n_locks)
        xs = xs + np.array([_jit(u[21 + i], 0.012) for i in range(n_locks)])
        tips = [(x + sweep * 0.012, 0.452 + 0.012 * abs((x - CX) / 0.2) + _jit(u[28 + i], 0.01))
                for i, x in enumerate(xs)]
        notches = [((xs[i] + xs[i + 1]) / 2 + sweep * 0.004, 0.372 + _jit(u[35 + i], 0.012))
                   for i in range(n_locks - 1)]
        pts = [np.array([edge_l])]
        prev = edge_l
        for i, tip in enumerate(tips):
            if i == 0:
                pts.append(_qbez(prev, (prev[0] + 0.01, tip[1] - 0.03), tip, 6)[1:])
            else:
                pts.append(_qbez(prev, (prev[0] - 0.006 * sweep, tip[1] - 0.035), tip, 6)[1:])
            nxt = notches[i] if i < len(notches) else edge_r
            ctrl = (nxt[0] + 0.004 * sweep, tip[1] - 0.03) if i < len(notches) else (nxt[0] - 0.01, tip[1] - 0.03)
            pts.append(_qbez(tip, ctrl, nxt, 6)[1:])
            prev = nxt
        fringe = np.concatenate(pts)                     # left -> right
        for nx, ny in notches:
            strands.append(_qbez((nx, ny - 0.004), (nx - 0.01 * sweep, ny - 0.05), (nx * 0.7 + CX * 0.3, ny - 0.12), 5))
        shadow_drop = 0.028
    else:
        px = CX + part
        arches = []
        for side in (-1, 1):   # temple -> parting, with two tufts curling into the forehead
            arch = _spline([(CX + side * 0.197, 0.452), (CX + side * 0.176, 0.395), (CX + side * 0.128, 0.335),
                            (px + side * 0.05, 0.29), (px, 0.272)], n=8)
            t = np.linspace(0.0, 1.0, len(arch))
            tangent = np.gradient(arch, axis=0)
            normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) * -side
            normal /= np.linalg.norm(normal, axis=1, keepdims=True)
            teeth = (t * 2.2 + 0.15 * u[36 + side]) % 1.0
            arch = arch + normal * (0.024 * teeth ** 2 * np.clip((1.0 - t) * 4, 0, 1))[:, None]
            arches.append(arch)
        fringe = np.concatenate([[edge_l], arches[0], arches[1][::-1][1:], [edge_r]])
        for side in (-1, 1):
            strands.append(_qbez((px + side * 0.012, 0.25), (CX + side * 0.12, 0.25), (CX + side * 0.19, 0.33), 6))
        shadow_drop = 0.014
    front_hair = np.concatenate([front_arc[1:-1], fringe[::-1]])
    forehead_shadow = np.concatenate([fringe, fringe[::-1] + (0.0, shadow_drop)])
    forehead_shadow[:, 0] = np.clip(forehead_shadow[:, 0], CX - 0.185 * fw, CX + 0.185 * fw)

    # angel-ring highlight on the crown
    ring_spans = ([(math.radians(200), math.radians(340))] if a.bangs == "yes"
                  else [(math.radians(196), math.radians(226)), (math.radians(314), math.radians(344))])
    rings = []
    for a0, a1 in ring_spans:
        outer_r = _ellipse(CX, hcy + 0.07, hrx * 0.86, hry * 0.86, n=12, a0=a0, a1=a1, endpoint=True)
        inner_r = _ellipse(CX, hcy + 0.07, hrx * 0.74, hry * 0.74, n=12, a0=a1, a1=a0, endpoint=True)
        inner_r[1::2] = inner_r[1::2] * 0.45 + outer_r[::-1][1::2] * 0.55   # zigzag lower edge
        rings.append(np.concatenate([outer_r, inner_r]))

    # accessories (needed early: they hide hair lines)
    hat = ribbon = None
    occl_top: list[np.ndarray] = []
    if a.accessory == "hat":
        tilt = _jit(u[40], 0.02)
        brim = _ellipse(CX, 0.222, 0.335, 0.068, n=32)
        brim[:, 1] += (brim[:, 0] - CX) * tilt
        crown = np.concatenate([_ellipse(CX, 0.227, 0.2, 0.15, n=20, a0=math.pi, a1=2 * math.pi, endpoint=True),
                                _ellipse(CX, 0.227, 0.2, 0.035, n=12, a0=0.0, a1=math.pi, endpoint=False)[1:]])
        crown[:, 1] += (crown[:, 0] - CX) * tilt
        band = np.concatenate([_ellipse(CX, 0.227, 0.2, 0.035, n=12, a0=0.0, a1=math.pi, endpoint=True),
                               _ellipse(CX, 0.189, 0.196, 0.035, n=12, a0=math.pi, a1=0.0, endpoint=True)])
        band[:, 1] += (band[:, 0] - CX) * tilt
        hat = (brim, crown, band)
        occl_top = [brim, crown]
    elif a.accessory == "ribbon":
        kx, ky = CX + 0.17 + _jit(u[41], 0.01), 0.165
        ang = math.radians(-18 + _jit(u[42], 10))
        rot = np.array([[math.cos(ang), math.sin(ang)], [-math.sin(ang), math.cos(ang)]])
        loop = _spline([(0.0, 0.0), (-0.04, -0.045), (-0.095, -0.05), (-0.11, 0.0), (-0.085, 0.05),
                        (-0.04, 0.035)], n=4, closed=True)
        tail = np.array([(-0.012, 0.01), (-0.045, 0.095), (-0.025, 0.088), (-0.008, 0.10), (0.006, 0.015)])
        parts = [loop, _mirror(loop, 0.0), tail, _mirror(tail, 0.0) + (0.0, -0.01)]
        knot = _ellipse(0.0, 0.0, 0.024, 0.026, n=14)
        ribbon = [p @ (1.15 * rot) + (kx, ky) for p in parts] + [knot @ (1.15 * rot) + (kx, ky)]
        occl_top = ribbon[:2] + ribbon[4:]

    # ---- painter order ----
    occl_hair = locks + occl_top
    # twin tails behind everything
    for t, shade in zip(tails, tail_shades):
        sc.fill(t, hair)
        sc.fill(shade, hair_shadow)
        sc.line("hair", t, 0.008, hair_line, closed=True, occluders=[back_hair, face] + occl_top)
    if tails:
        for side, t in ((-1, tails[0]), (1, tails[1])):
            tie = _ellipse(CX + side * 0.238, 0.262, 0.026, 0.03, n=14)
            acc = _far_from(_ACCENTS, [hair], u[43])
            sc.shape("hair", tie, acc, 0.006, _scale(acc, 0.5), occluders=occl_top)
    # back hair
    neck = np.array([(CX - 0.056, 0.60), (CX - 0.06, 0.87), (CX + 0.06, 0.87), (CX + 0.056, 0.60)])
    body_top = _spline([(CX - 0.062, 0.842), (CX - 0.15, 0.862), (CX - 0.26, 0.885), (CX - 0.34, 0.925),
                        (CX - 0.385, 1.0), (CX - 0.40, 1.08)], n=5)
    body = np.concatenate([body_top[::-1], _mirror(body_top[::-1])])   # bottom-left -> neck -> bottom-right
    sc.fill(back_hair, hair_shadow)
    sc.line("hair", back_hair, 0.008, hair_line, closed=True, occluders=[face, neck, body] + occl_hair)
    # neck and body
    sc.fill(neck, skin)
    neck_shadow = np.concatenate([jaw[12:-12], jaw[12:-12][::-1] + (0.0, 0.04)])
    neck_shadow[:, 0] = np.clip(neck_shadow[:, 0], CX - 0.058, CX + 0.058)
    sc.fill(neck_shadow, skin_shadow)
    for side in (-1, 1):
        nl = np.array([(CX + side * 0.056, 0.62), (CX + side * 0.06, 0.85)])
        nl = _spline(nl, n=8)
        sc.line("outline", nl, 0.007, skin_line, occluders=[face, body] + locks)
    sc.fill(body, clothes)
    sc.line("outline", body_top, 0.008, clothes_line, occluders=locks)
    sc.line("outline", _mirror(body_top), 0.008, clothes_line, occluders=locks)
    neckline = np.array([(CX - 0.062, 0.842), (CX, 0.93), (CX + 0.062, 0.842)])
    sc.fill(neckline, skin)
    collar_col = (250, 250, 252) if sum(clothes) < 600 else (52, 62, 104)
    for side in (-1, 1):
        flap = np.array([(CX + side * 0.062, 0.842), (CX + side * 0.13, 0.86), (CX + side * 0.05, 0.965),
                         (CX, 0.93)])
        sc.shape("outline", flap, collar_col, 0.006, _scale(collar_col, 0.5) if sum(collar_col) > 400 else (20, 20, 30),
                 occluders=locks)
    # face
    sc.fill(face, skin)
    sc.line("outline", jaw, 0.009, skin_line, occluders=[front_hair] + locks)
    if blush:
        for side in (-1, 1):
            sc.fill(_ellipse(CX + side * (sep + 0.025), ey + 0.075, 0.036, 0.014, n=16),
                    _mix(skin, (255, 110, 130), 0.3))
    # eyes and eyebrows
    _draw_eyes(sc, a, u, eye, ey, sep, es, hair_line)
    # nose and mouth
    nose = np.array([(CX + 0.004, 0.626), (CX - 0.004, 0.640), (CX + 0.004, 0.643)])
    sc.line("details", nose, 0.006, skin_line)
    _draw_mouth(sc, a, u, chin_y, skin_line)
    # front hair
    sc.fill(forehead_shadow, skin_shadow)
    sc.fill(front_hair, hair)
    for r in rings:
        sc.fill(r, hair_light)
    sc.line("hair", fringe, 0.008, hair_line, occluders=occl_hair)
    for s in strands:
        sc.line("hair", s, 0.005, hair_line, occluders=occl_top)
    for lk in locks:
        sc.shape("hair", lk, hair, 0.008, hair_line, occluders=occl_top)
    # eyebrows, painted over the hair as anime does
    for side in (-1, 1):
        by = ey - 0.082 * es - (0.022 if a.expression == "surprised" else 0.0) + _jit(u[44], 0.005)
        arch = 0.016 if a.expression in ("surprised", "smile", "laughing") else 0.008
        ex = CX + side * sep
        brow = _qbez((ex - side * 0.038, by + 0.008), (ex + side * 0.005, by - arch), (ex + side * 0.055, by + 0.004), 7)
        sc.line("eyes", brow, 0.008, hair_line)
    # glasses
    if a.glasses == "yes":
        frame = _FRAMES[int(u[45] * len(_FRAMES)) % len(_FRAMES)]
        for side in (-1, 1):
            ex = CX + side * sep
            rim = _rounded_rect(ex, ey + 0.006, 0.074 * es, 0.058 * es, 0.025)
            sc.line("details", rim, 0.011, frame, closed=True)
            arm = np.array([(ex + side * 0.074 * es, ey - 0.012), (CX + side * 0.205 * fw, ey - 0.02)])
            sc.line("details", arm, 0.009, frame, occluders=locks)
        bridge = _qbez((CX - sep + 0.074 * es, ey - 0.008), (CX, ey - 0.03), (CX + sep - 0.074 * es, ey - 0.008), 7)
        sc.line("details", bridge, 0.009, frame)
    # accessory
    if hat is not None:
        col = _far_from(_HATS, [hair, bg_base], u[46], 170)
        band_col = _far_from(_ACCENTS, [col], u[47])
        line_col = _scale(col, 0.5) if sum(col) > 300 else _mix(col, (0, 0, 0), 0.5)
        brim, crown, band = hat
        sc.shape("details", brim, col, 0.008, line_col)
        sc.shape("details", crown, _scale(col, 0.96), 0.008, line_col)
        sc.shape("details", band, band_col, 0.006, line_col)
    elif ribbon is not None:
        col = _far_from(_ACCENTS, [hair, bg_base], u[48], 180)
        line_col = _scale(col, 0.5) if sum(col) > 300 else _mix(col, (0, 0, 0), 0.6)
        for i in (2, 3, 0, 1, 4):
            sc.shape("details", ribbon[i], col if i != 4 else _scale(col, 0.9), 0.007, line_col)
    return sc, bg


def _rounded_rect(cx: float, cy: float, hw: float, hh: float, r: float) -> np.ndarray:
    corners = [(cx + hw - r, cy + hh - r, 0.0), (cx - hw + r, cy + hh - r, 0.5 * math.pi),
               (cx - hw + r, cy - hh + r, math.pi), (cx + hw - r, cy - hh + r, 1.5 * math.pi)]
    return np.concatenate([_ellipse(x, y, r, r, n=6, a0=a, a1=a + 0.5 * math.pi, endpoint=True)
                           for x, y, a in corners])


def _lid_y(curve: np.ndarray, x: np.ndarray) -> np.ndarray:
    order = np.argsort(curve[:, 0])
    return np.interp(x, curve[order, 0], curve[order, 1])


def _draw_eyes(sc: _Scene, a: PortraitAttributes, u: np.ndarray, eye: tuple, ey: float, sep: float, es: float,
               hair_line: tuple) -> None:
    openness = {"neutral": 1.0, "smile": 0.94, "laughing": 0.88, "surprised": 1.06}[a.expression]
    iris_scale = 1.0
    iris_dark = _scale(eye, 0.55)
    iris_light = _mix(eye, _WHITE, 0.38)
    pupil = _mix(_scale(eye, 0.22), (10, 5, 20), 0.5)
    w = 0.068 * es
    h = 0.061 * es * openness
    for side in (-1, 1):      # side = -1: the eye on the image's left; "inner" corner points to the nose
        ex = CX + side * sep
        inner = (ex - side * w, ey + 0.006)
        outer = (ex + side * w * 1.02, ey - 0.014)
        upper = _spline([outer, (ex + side * 0.55 * w, ey - 0.88 * h), (ex, ey - h),
                         (ex - side * 0.6 * w, ey - 0.8 * h), inner], n=5)
        lower = _spline([inner, (ex - side * 0.55 * w, ey + 0.72 * h), (ex, ey + 0.92 * h),
                         (ex + side * 0.6 * w, ey + 0.7 * h), outer], n=5)
        white = np.concatenate([upper, lower[1:-1]])
        sc.fill(white, _WHITE)
        icx, icy = ex - side * 0.06 * w, ey + 0.06 * h
        irx, iry = 0.68 * w * iris_scale, 0.98 * h * iris_scale / openness ** 0.5
        iris = _ellipse(icx, icy, irx, iry, n=24)
        iris_lower = _ellipse(icx, icy + 0.3 * iry, 0.82 * irx, 0.7 * iry, n=20)
        iris_glow = _ellipse(icx, icy + 0.62 * iry, 0.55 * irx, 0.32 * iry, n=16)
        pup = _ellipse(icx, icy + 0.05 * iry, 0.36 * irx, 0.46 * iry, n=16)
        for shape in (iris, iris_lower, iris_glow, pup):   # keep inside the eye opening
            shape[:, 1] = np.clip(shape[:, 1], _lid_y(upper, shape[:, 0]), _lid_y(lower, shape[:, 0]))
        sc.fill(iris, iris_dark)
        sc.fill(iris_lower, eye)
        sc.fill(iris_glow, iris_light)
        sc.fill(pup, pupil)
        sc.line("eyes", iris, 0.005, iris_dark, closed=True)
        sc.line("eyes", pup, 0.004, pupil, closed=True)
        sc.fill(_ellipse(icx - 0.38 * irx, icy - 0.42 * iry, 0.3 * irx, 0.24 * iry, n=12), _WHITE)
        sc.fill(_ellipse(icx + 0.4 * irx, icy + 0.42 * iry, 0.13 * irx, 0.11 * iry, n=8), _WHITE)
        lash = np.concatenate([[(outer[0] + side * 0.016, outer[1] + 0.014)], upper])
        sc.line("eyes", lash, 0.017 * es, _EYE_LINE)
        sc.line("eyes", lower[int(len(lower) * 0.45):], 0.006, _EYE_LINE)


def _draw_mouth(sc: _Scene, a: PortraitAttributes, u: np.ndarray, chin_y: float, line: tuple) -> None:
    my = chin_y - 0.06 + _jit(u[49], 0.004)
    if a.expression == "neutral":
        w = 0.022 + _jit(u[50], 0.003)
        sc.line("details", _qbez((CX - w, my), (CX, my + 0.004), (CX + w, my), 5), 0.008, line)
    elif a.expression == "smile":
        w = 0.04 + _jit(u[50], 0.004)
        sc.line("details", _spline([(CX - w, my - 0.014), (CX - 0.5 * w, my + 0.006), (CX, my + 0.011),
                                    (CX + 0.5 * w, my + 0.006), (CX + w, my - 0.014)], n=4), 0.009, line)
    elif a.expression == "laughing":
        w = 0.046 + _jit(u[50], 0.004)
        top = _qbez((CX - w, my - 0.016), (CX, my - 0.006), (CX + w, my - 0.016), 7)
        bottom = _ellipse(CX, my - 0.012, w * 0.98, 0.056, n=16, a0=0.0, a1=math.pi, endpoint=True)[1:-1]
        mouth = np.concatenate([top, bottom])
        sc.fill(mouth, _MOUTH)
        tongue = _ellipse(CX, my - 0.012, w * 0.98, 0.056, n=10, a0=math.radians(35), a1=math.radians(145),
                          endpoint=True)
        sc.fill(tongue, _TONGUE)
        sc.line("details", mouth, 0.008, line, closed=True)
    else:  # surprised: a small 'o'
        o = _ellipse(CX, my + 0.004, 0.021 + _jit(u[50], 0.002), 0.029, n=16)
        sc.fill(o, _MOUTH)
        sc.line("details", o, 0.007, line, closed=True)


# --------------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------------

def measure_render_rate(size: int, n: int = 200, seed: int = 0) -> float:
    """Colour portraits per second on one thread (attributes sampled, no line art)."""
    world = PortraitWorld()
    for i in range(3):  # warm the caches
        world.sample(seed + i, size=size, with_line_art=False)
    t0 = time.perf_counter()
    for i in range(n):
        world.sample(seed + i, size=size, with_line_art=False)
    return n / (time.perf_counter() - t0)
