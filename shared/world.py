"""The procedural synthetic world: images, captions, regions, VQA and a caption checker.

No image-caption corpus can be downloaded at run time, so every paper in this repository trains
and is measured on this world. It is known exactly, so besides BLEU and CIDEr-D we can ask
whether a generated caption is *true* of its image (`is_true`).

Design, in the order a call to `World.example(i)` runs:

    1. scene     `default_rng([seed, split_id, i])` (train 0, val 1, test 2; the classification
                 view uses 10, 11, 12, so no two splits or views share a random stream) draws
                 1..max_objects objects (shape, colour, size, position; boxes never touch) and a
                 background style. Nothing is rendered yet: `World.scene(i)` stops here.
    2. render    Pillow draws the objects at 2x on a muted background colour and box-downsamples
                 (anti-aliased edges); then a lighting gradient and pixel noise (a crop of a fixed
                 noise texture at an offset stored in the scene) are added, so `render(scene)` is
                 a pure function of the scene.
    3. captions  a small grammar (below), every caption true of the scene by construction.
    4. VQA       templated questions whose answers are computed from the scene.
    5. regions   a toy detector (`Detector`): proposal boxes (jittered object boxes, shifted or
                 scaled copies, background boxes), features computed from the pixels inside each
                 box, and a nearest-centroid classifier fit on rendered objects, which gives
                 `cls_prob`, `conf` and the object `tags`. It makes mistakes, as real ones do.

Steps 1-4 draw from the same generator in that order and step 5 draws last, so
`example(i, regions=False)` returns the same image, captions and questions as `example(i)`.

Caption grammar (lowercase words, single spaces, no punctuation; `parse_caption` reads it):

    caption  := ["there is" | "there are"] (list | item ("and" item)*)
    list     := NUMBER ("object" | "objects") np (["and"] np)*   exactly NUMBER objects, one per np
    item     := np                                               such an object exists
              | np ["is"] RELATION np                            a pair in that relation exists
              | NUMBER [SIZE] [COLOUR] NOUN                      exactly NUMBER such objects
                                                                 (NUMBER = "no" is never generated)
    np       := ("a" | "an") [SIZE] [COLOUR] (SHAPE | "object")
    RELATION := "to the left of" | "to the right of" | "above" | "below"
    NUMBER   := "no" | "one" | "two" | ... | "six"

Plain noun phrases joined by "and" must name *different* objects ("a circle and a circle" needs
two circles). "A is left of B" holds when A's box ends at or before B's box starts (x2_A <= x1_B,
boxes in pixels with exclusive x2, y2); the generator only states relations that hold with a
margin of 5 % of the image (`relation_margin`), so no stated relation is borderline.

Regions (the per-image npz layout of shared.folders.RegionFolder; N = n_regions, F = feature_dim,
C = 6 shape classes): boxes (N, 4) x1, y1, x2, y2 / image side, in [0, 1]; features (N, F);
cls_prob (N, C+1) with background at 0; conf = 1 - cls_prob[:, 0] = P(not background); rows
sorted by conf, descending; tags = the best *foreground* class of every region with conf > 0.5,
in that order (duplicates and mistakes included, as with a real detector's object tags).

VQA answers (`ANSWERS`): "yes", "no", the counts as words "zero".."six", the six colours and the
six shapes. Counts are words, not digits, so that answers share the captions' vocabulary.

Throughput, one process pinned to one core, examples/s with region features (example(i)) and
without (example(i, regions=False)); measured numbers are in RESULTS.md:

    taskset -c 0 python -m shared.world --bench
    taskset -c 0 python -m shared.world --bench --image_size 224 --feature_dim 2048

and the R@1 that idealised scorers of the world's captions would reach (retrieval_ceilings), a
yardstick for the retrieval metrics: python -m shared.world --retrieval_ceilings
"""

import argparse
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# --- 1. The vocabulary of the world ------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "star", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# The 36 (colour, shape) classes of the classification view, colour-major: "red circle" = 0.
CLASS_NAMES = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)
# The detector's classes; index 0 is background, as in Faster R-CNN's softmax and in the soft
# labels UNITER's MRC reads (ChenRocks/UNITER model/pretrain.py: "background class should not
# be the target").
DETECTOR_CLASSES = ("background",) + SHAPES
MAX_OBJECTS = 6  # the largest max_objects we support (counts are words up to "six")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")  # VQA count answers
ANSWERS = ("yes", "no") + NUMBER_WORDS + COLOURS + SHAPES  # the fixed VQA answer vocabulary

# Drawn RGB of each colour (each object adds a jitter of up to +-12 per channel). Chosen far
# apart from each other and far more saturated than any background.
PALETTE = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (45, 85, 225),
           "yellow": (235, 210, 45), "purple": (145, 60, 200), "orange": (245, 135, 35)}
SIZE_RANGE = {"small": (0.14, 0.18), "large": (0.28, 0.34)}  # object extent / image side
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above",
             "below": "below"}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
CLASSIFICATION_SPLIT_OFFSET = 10  # ClassificationWorld uses split ids 10, 11, 12
NOISE_STD = 6.0  # pixel noise, in 0..255 units
DETECTOR_SEED = 1234  # the detector (projection + classifier fit) is fixed, whatever the world seed
TEXTURE_SEED = 4321  # the pixel-noise texture, likewise
TAG_THRESHOLD = 0.5  # regions with conf above this give an object tag


def _unit_polygon(points: list[tuple[float, float]]) -> tuple[tuple, float]:
    """Vertices rescaled to fill the unit box [0, 1]^2, and the natural aspect ratio w / h."""
    p = np.asarray(points, dtype=np.float64)  # (K, 2)
    lo, hi = p.min(0), p.max(0)
    unit = (p - lo) / (hi - lo)  # (K, 2)
    return tuple((float(u), float(v)) for u, v in unit), float((hi - lo)[0] / (hi - lo)[1])


def _regular(k: int, start_deg: float, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular k-gon (or k-pointed star with inner radius `inner`), y pointing down."""
    n = 2 * k if inner else k
    radii = [1.0 if (j % 2 == 0 or not inner) else inner for j in range(n)]
    angles = [math.radians(start_deg + 360.0 * j / n) for j in range(n)]
    return [(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles)]


# Each shape as (vertices in its unit box, width / height). The circle is drawn as an ellipse.
SHAPE_POLYGONS = {
    "circle": (None, 1.0),
    "square": _unit_polygon([(0, 0), (1, 0), (1, 1), (0, 1)]),
    "triangle": _unit_polygon(_regular(3, -90)),  # apex up, width / height = 2 / sqrt(3)
    "diamond": (((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)), 0.75),  # taller than wide
    "star": _unit_polygon(_regular(5, -90, inner=0.42)),  # five points, one up
    "hexagon": _unit_polygon(_regular(6, 0)),  # flat top and bottom, pointed left and right
}


# --- 2. Configuration and scene records ---------------------------------------------------------

@dataclass
class WorldConfig:
    """What the world looks like and how large each split is (all OURS: no paper has this)."""
    seed: int = 0  # with (split, i) it fixes example i completely
    image_size: int = 64  # side of the square canvas in pixels, 32..512
    max_objects: int = 4  # scenes hold 1..max_objects objects
    single_object_prob: float = 0.0  # train split only: P(scene has exactly one object)
    n_captions: int = 5  # captions per image
    n_regions: int = 10  # N: detector regions per image (Oscar / UNITER)
    feature_dim: int = 64  # F: region feature size (2048 for the paper presets)
    n_questions: int = 4  # VQA pairs per image
    n_train: int = 1_000_000
    n_val: int = 1000
    n_test: int = 1000

    def __post_init__(self):
        checks = [
            (32 <= self.image_size <= 512, f"image_size must be in 32..512, got {self.image_size}"),
            (1 <= self.max_objects <= MAX_OBJECTS,
             f"max_objects must be in 1..{MAX_OBJECTS}, got {self.max_objects}"),
            (0.0 <= self.single_object_prob <= 1.0,
             f"single_object_prob must be a probability, got {self.single_object_prob}"),
            (self.n_captions >= 1, f"n_captions must be >= 1, got {self.n_captions}"),
            (self.n_regions >= 1, f"n_regions must be >= 1, got {self.n_regions}"),
            (self.feature_dim >= 1, f"feature_dim must be >= 1, got {self.feature_dim}"),
            (self.n_questions >= 0, f"n_questions must be >= 0, got {self.n_questions}"),
            (min(self.n_train, self.n_val, self.n_test) >= 1,
             f"split sizes must be >= 1, got {self.n_train}, {self.n_val}, {self.n_test}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class Obj:
    """One object. `box` = (x1, y1, x2, y2) in pixels, x2 and y2 exclusive."""
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int] | None = None  # drawn colour (palette + jitter); None = palette


@dataclass
class Scene:
    """Everything `render_scene` needs: objects and the background style."""
    objects: list[Obj]
    image_size: int
    background: tuple[int, int, int] = (128, 128, 128)  # base RGB, muted
    gradient: tuple[float, float] = (0.0, 0.0)  # brightness change across the image, x and y
    noise_offset: tuple[int, int] = (0, 0)  # where the noise texture is cropped (y, x)


def relation_gap(a: Obj, b: Obj, relation: str) -> int:
    """How many pixels `a` clears `b` in `relation`: >= 0 means "a is <relation> b" holds."""
    if relation == "left":
        return b.box[0] - a.box[2]
    if relation == "right":
        return a.box[0] - b.box[2]
    if relation == "above":
        return b.box[1] - a.box[3]
    return a.box[1] - b.box[3]  # below


def relation_margin(image_size: int) -> int:
    """Stated relations clear this many pixels (5 % of the image, at least 2)."""
    return max(2, math.ceil(0.05 * image_size))


# --- 3. Sampling and rendering scenes -----------------------------------------------------------

class _Uniforms:
    """Uniform numbers in [0, 1) from a Generator, drawn 64 at a time: the caption and question
    templates take dozens of single numbers, and a numpy call per number would double their cost."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.buffer = rng, []

    def __call__(self) -> float:
        if not self.buffer:
            self.buffer = self.rng.random(64).tolist()
        return self.buffer.pop()


def _pick(u: _Uniforms, options):
    """A uniform choice from a sequence."""
    return options[int(u() * len(options))]


def _shuffled(u: _Uniforms, items) -> list:
    """The items in a uniformly random order."""
    keys = [u() for _ in items]
    return [items[j] for j in sorted(range(len(items)), key=keys.__getitem__)]


PLACE_TRIES = 32  # candidate positions per object


def sample_scene(rng: np.random.Generator, image_size: int, n_objects: int,
                 forced: tuple[str, str] | None = None) -> Scene:
    """Draw a scene: background style, then objects placed so that no two boxes touch.

    An object that finds no free place in PLACE_TRIES tries is redrawn small, then dropped (only
    happens with many large objects on a small canvas). `forced` = (colour, shape) of the objects.
    All uniforms come from one draw (per-call overhead dominates at this size).
    """
    S = image_size
    per_object = 7 + 2 * PLACE_TRIES
    u = rng.random(8 + n_objects * per_object).tolist()
    level = 70 + 110 * u[0]  # muted: a grey level 70..180 plus a tint of +-18 per channel
    background = tuple(int(level - 18 + 36 * t) for t in u[1:4])
    gradient = (-35 + 70 * u[4], -35 + 70 * u[5])  # brightness change across x and y
    noise_offset = (int(u[6] * (S + 1)), int(u[7] * (S + 1)))
    gap = max(1, round(0.03 * S))  # free pixels kept between any two boxes
    objects, taken = [], []  # taken: the boxes placed so far, grown by the gap
    for k in range(n_objects):
        v = u[8 + k * per_object: 8 + (k + 1) * per_object]
        colour, shape = forced or (COLOURS[int(6 * v[0])], SHAPES[int(6 * v[1])])
        aspect = SHAPE_POLYGONS[shape][1]  # width / height
        for size in (("large", "small") if v[2] < 0.5 else ("small",)):
            lo, hi = SIZE_RANGE[size]
            extent = (lo + (hi - lo) * v[3]) * S  # the longer side, in pixels
            w = max(3, round(extent * min(1.0, aspect)))
            h = max(3, round(extent * min(1.0, 1.0 / aspect)))
            box = None
            for t in range(PLACE_TRIES):  # the first candidate that touches no placed box
                x1 = 1 + int(v[7 + 2 * t] * (S - 2 - w))  # 1 px inside the canvas
                y1 = 1 + int(v[8 + 2 * t] * (S - 2 - h))
                x2, y2 = x1 + w, y1 + h
                if all(x2 <= a1 or a2 <= x1 or y2 <= b1 or b2 <= y1 for a1, b1, a2, b2 in taken):
                    box = (x1, y1, x2, y2)
                    break
            if box is not None:
                rgb = tuple(min(255, max(0, c - 12 + int(25 * j)))  # jitter +-12 per channel
                            for c, j in zip(PALETTE[colour], v[4:7]))
                objects.append(Obj(shape, colour, size, box, rgb))
                taken.append((x1 - gap, y1 - gap, x2 + gap, y2 + gap))
                break
    return Scene(objects, S, background, gradient, noise_offset)


def noise_texture(image_size: int) -> np.ndarray:
    """The fixed pixel-noise texture, float32 (2S, 2S, 3); scenes crop an S x S window of it."""
    rng = np.random.default_rng([TEXTURE_SEED, image_size])
    grain = rng.standard_normal((2 * image_size, 2 * image_size, 3)) * NOISE_STD  # (2S, 2S, 3)
    return grain.astype(np.float32)


def render_scene(scene: Scene, noise: np.ndarray) -> np.ndarray:
    """Scene -> uint8 image (S, S, 3): background colour, anti-aliased objects, a lighting
    gradient and pixel noise.

    Pillow draws the objects at 2x on the flat background colour and `reduce(2)` averages each
    2x2 block, so edge pixels get the coverage-weighted mix of object and background
    (anti-aliasing). The gradient (brightness changing linearly across the image, objects
    included, like uneven light) and the grain (a crop of the noise texture) are added last.
    Arrays are handled as (S, 3S) rows so that no numpy loop runs over a length-3 axis.
    """
    S = scene.image_size
    canvas = Image.new("RGB", (2 * S, 2 * S), scene.background)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x1, y1, x2, y2 = (2 * v for v in obj.box)  # at 2x; x2, y2 exclusive
        rgb = obj.rgb or PALETTE[obj.colour]
        unit = SHAPE_POLYGONS[obj.shape][0]
        if unit is None:
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=rgb)
        else:
            w, h = x2 - 1 - x1, y2 - 1 - y1
            draw.polygon([(x1 + a * w, y1 + b * h) for a, b in unit], fill=rgb)
    image = np.asarray(canvas.reduce(2)).reshape(S, 3 * S)  # (S, 3S) uint8
    ramp = np.linspace(-0.5, 0.5, S, dtype=np.float32)  # (S,)
    gx, gy = scene.gradient
    light = np.add.outer(gy * ramp + 0.5, np.repeat(gx * ramp, 3))  # (S, 3S), +0.5 rounds
    oy, ox = scene.noise_offset
    grain = noise[oy:oy + S, ox:ox + S].reshape(S, 3 * S)  # (S, 3S), a view
    return np.clip(image + light + grain, 0, 255).astype(np.uint8).reshape(S, S, 3)


# --- 4. Captions: the grammar's generator -------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: Obj, u: _Uniforms, p_size: float = 0.35) -> str:
    """'a [size] [colour] shape|object', true of `obj`; names at least its colour or shape."""
    words = [obj.size] if u() < p_size else []
    with_colour = u() < 0.85
    if with_colour:
        words.append(obj.colour)
    words.append(obj.shape if (u() < 0.9 or not with_colour) else "object")
    return _article(words[0]) + " " + " ".join(words)


def _count_phrase(n: int, size=None, colour=None, shape=None) -> str:
    """'two red circles', 'no squares', 'one object'."""
    noun = (shape or "object") + ("" if n == 1 else "s")
    number = "no" if n == 0 else NUMBER_WORDS[n]
    return " ".join(w for w in (number, size, colour, noun) if w)


class _Facts:
    """What the caption and question templates ask of one scene, computed once.

    counts[(size, colour, shape)] = how many objects match, None being a wildcard;
    gaps[(j, k)] = relation_gap(object j, object k, rel) for rel in RELATIONS order;
    clear = [(a, b, rel)]: the relations that hold by the margin (the only ones captions state).
    """

    def __init__(self, scene: Scene):
        self.objects = objs = scene.objects
        self.margin = relation_margin(scene.image_size)
        self.counts = Counter((z, c, s) for o in objs for z in (o.size, None)
                              for c in (o.colour, None) for s in (o.shape, None))
        self.gaps = {(j, k): tuple(relation_gap(a, b, rel) for rel in RELATIONS)
                     for j, a in enumerate(objs) for k, b in enumerate(objs) if j != k}
        self.clear = [(objs[j], objs[k], rel) for (j, k), gaps in self.gaps.items()
                      for rel, gap in zip(RELATIONS, gaps) if gap >= self.margin]

    def count(self, size=None, colour=None, shape=None) -> int:
        return self.counts[(size, colour, shape)]


def _caption_attribute(facts, u):
    """'there is a large red circle'."""
    obj = _pick(u, facts.objects)
    return ("there is " if u() < 0.3 else "") + _noun_phrase(obj, u)


def _caption_pair(facts, u):
    """'a red circle and a blue star [and a green square]': different objects."""
    objs = facts.objects
    if len(objs) < 2:
        return None
    k = 3 if (len(objs) >= 3 and u() < 0.3) else 2
    return " and ".join(_noun_phrase(o, u) for o in _shuffled(u, objs)[:k])


def _caption_relation(facts, u):
    """'a blue star [is] to the left of a yellow square', only when it holds by the margin."""
    if not facts.clear:
        return None
    a, b, rel = _pick(u, facts.clear)
    verb = " is " if u() < 0.3 else " "
    return _noun_phrase(a, u) + verb + RELATIONS[rel] + " " + _noun_phrase(b, u)


def _caption_count(facts, u):
    """'two triangles and a green diamond', 'there are three objects'.

    Zero counts ('no squares') are parsed by `is_true` but never generated: one of them is true
    of most scenes, so a captioner could reach a high truth rate by always saying it.
    """
    objs = facts.objects
    filters = ([(None, None, s) for s in SHAPES] + [(None, c, None) for c in COLOURS]
               + [(z, None, None) for z in SIZES])
    many = [f for f in filters if facts.count(*f) >= 2]  # attributes shared by 2+ objects
    if not many or (len(objs) >= 2 and u() < 0.25):  # the total count stands alone: 'three
        if len(objs) < 2:  # objects and a red circle' would read as four objects
            return None
        return ("there are " if u() < 0.5 else "") + _count_phrase(len(objs))
    size, colour, shape = _pick(u, many)
    phrase = _count_phrase(facts.count(size, colour, shape), size, colour, shape)
    # add an object the count does not cover: 'two triangles and a green diamond'
    others = [o for o in objs if not _matches((size, colour, shape), o)]
    if others and u() < 0.6:
        other = _noun_phrase(_pick(u, others), u)
        return phrase + " and " + other if u() < 0.5 else other + " and " + phrase
    return ("there are " if u() < 0.3 else "") + phrase


def _caption_list(facts, u):
    """'three objects a red circle a blue star and a green square' (all objects, any order)."""
    nps = [_noun_phrase(o, u, p_size=0.3) for o in _shuffled(u, facts.objects)]
    body = " ".join(nps[:-1]) + " and " + nps[-1] if len(nps) > 1 else nps[0]
    return _count_phrase(len(nps)) + " " + body


# How often each caption type is tried, as a list of 20 entries (each = 5 %)
CAPTION_KINDS = ((_caption_attribute,) * 4 + (_caption_pair,) * 4 + (_caption_relation,) * 5
                 + (_caption_count,) * 3 + (_caption_list,) * 4)


def make_captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """n captions of the scene, all true, distinct unless 8n tries found too few (tiny scenes).
    Ends: the attribute type always succeeds."""
    facts, u = _Facts(scene), _Uniforms(rng)
    captions, tries = [], 0
    while len(captions) < n:
        caption = _pick(u, CAPTION_KINDS)(facts, u)  # None: impossible here, try another
        tries += 1
        if caption is not None and (caption not in captions or tries > 8 * n):
            captions.append(caption)
    return captions


# --- 5. Captions: the checker -------------------------------------------------------------------

_NUMBERS = {"no": 0, **{w: k for k, w in enumerate(NUMBER_WORDS) if k > 0}}
_RELATION_WORDS = {tuple(words.split()): rel for rel, words in RELATIONS.items()}


class _Parser:
    """Recursive descent over the caption grammar of the module docstring.

    Claims: ("exists", np), ("rel", np, relation, np), ("count", n, np), ("list", n, [np, ...]),
    where np = (size | None, colour | None, shape | None). Any deviation raises ValueError.
    """

    def __init__(self, words: list[str]):
        self.words, self.pos = words, 0

    def peek(self, k: int = 0):
        j = self.pos + k
        return self.words[j] if j < len(self.words) else None

    def take(self, allowed) -> str:
        word = self.peek()
        if word is None or word not in allowed:
            raise ValueError(f"expected one of {sorted(allowed)} at word {self.pos}")
        self.pos += 1
        return word

    def at_end(self) -> bool:
        return self.pos == len(self.words)

    def caption(self) -> list[tuple]:
        if self.peek() == "there" and self.peek(1) in ("is", "are"):
            self.pos += 2
        if (self.peek() in _NUMBERS and self.peek(1) in ("object", "objects")
                and self.peek(2) in ("a", "an")):  # a list: 'three objects a ...'
            n = _NUMBERS[self.take(_NUMBERS)]
            self.take({"object"} if n == 1 else {"objects"})
            nps = [self.noun_phrase()]
            while not self.at_end():
                if self.peek() == "and":
                    self.pos += 1
                nps.append(self.noun_phrase())
            return [("list", n, nps)]
        claims = [self.item()]
        while not self.at_end():
            self.take({"and"})
            claims.append(self.item())
        return claims

    def item(self) -> tuple:
        if self.peek() in _NUMBERS:
            n = _NUMBERS[self.take(_NUMBERS)]
            size, colour = self.optional(SIZES), self.optional(COLOURS)
            nouns = {s: s for s in SHAPES} | {"object": None}
            if n != 1:
                nouns = {k + "s": v for k, v in nouns.items()}
            return ("count", n, (size, colour, nouns[self.take(nouns)]))
        np_a = self.noun_phrase()
        has_verb = self.peek() == "is"
        self.pos += has_verb
        relation = self.relation(required=has_verb)
        if relation is None:
            return ("exists", np_a)
        return ("rel", np_a, relation, self.noun_phrase())

    def noun_phrase(self) -> tuple:
        self.take({"a", "an"})
        size, colour = self.optional(SIZES), self.optional(COLOURS)
        noun = self.take(set(SHAPES) | {"object"})
        return (size, colour, None if noun == "object" else noun)

    def optional(self, allowed):
        return self.take(allowed) if self.peek() in allowed else None

    def relation(self, required: bool):
        for words, rel in _RELATION_WORDS.items():
            if tuple(self.words[self.pos:self.pos + len(words)]) == words:
                self.pos += len(words)
                return rel
        if required:
            raise ValueError(f"expected a relation at word {self.pos}")
        return None


def parse_caption(text) -> list[tuple] | None:
    """The claims a caption makes (see `_Parser`), or None if it is not in the grammar."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        return _Parser(text.lower().split()).caption()
    except ValueError:
        return None


def _matches(np_: tuple, obj: Obj) -> bool:
    size, colour, shape = np_
    return ((size is None or obj.size == size) and (colour is None or obj.colour == colour)
            and (shape is None or obj.shape == shape))


def _distinct_match(nps: list[tuple], objects: list[Obj], used: frozenset = frozenset()) -> bool:
    """Can each noun phrase be given its own object? (backtracking; depth <= len(objects))."""
    if not nps:
        return True
    return any(k not in used and _matches(nps[0], o)
               and _distinct_match(nps[1:], objects, used | {k}) for k, o in enumerate(objects))


def is_true(caption: str, scene: Scene) -> bool:
    """Does every object, attribute, count and relation the caption states hold in the scene?

    The text is lower-cased and split on whitespace; anything outside the grammar (the empty
    string, punctuation, unknown words, non-strings) is False. Never raises.
    """
    claims = parse_caption(caption)
    if claims is None:
        return False
    objs = scene.objects
    exists = [c[1] for c in claims if c[0] == "exists"]
    if len(exists) > len(objs) or not _distinct_match(exists, objs):
        return False
    for claim in claims:
        if claim[0] == "rel":
            _, np_a, rel, np_b = claim
            if not any(a is not b and _matches(np_a, a) and _matches(np_b, b)
                       and relation_gap(a, b, rel) >= 0 for a in objs for b in objs):
                return False
        elif claim[0] == "count" and sum(_matches(claim[2], o) for o in objs) != claim[1]:
            return False
        elif claim[0] == "list":
            _, n, nps = claim
            if not (len(objs) == n == len(nps) and _distinct_match(nps, objs)):
                return False
    return True


# --- 6. VQA: templated questions ----------------------------------------------------------------

def _q_colour(facts, u):
    """'what colour is the [size] star' for a uniquely identified shape."""
    options = []
    for o in facts.objects:
        if facts.count(shape=o.shape) == 1:
            options.append((f"what colour is the {o.shape}", o.colour))
        elif facts.count(size=o.size, shape=o.shape) == 1:
            options.append((f"what colour is the {o.size} {o.shape}", o.colour))
    return _pick(u, options) if options else None


def _q_shape(facts, u):
    """'what shape is the [size] red object' for a uniquely identified colour."""
    options = []
    for o in facts.objects:
        if facts.count(colour=o.colour) == 1:
            options.append((f"what shape is the {o.colour} object", o.shape))
        elif facts.count(size=o.size, colour=o.colour) == 1:
            options.append((f"what shape is the {o.size} {o.colour} object", o.shape))
    return _pick(u, options) if options else None


def _q_count(facts, u):
    """'how many squares are there' (half the time a present shape, else any: zeros occur)."""
    kind = u()
    if kind < 0.15:
        return "how many objects are there", NUMBER_WORDS[facts.count()]
    if kind < 0.35:
        colour = _pick(u, COLOURS)
        return f"how many {colour} objects are there", NUMBER_WORDS[facts.count(colour=colour)]
    shape = _pick(u, facts.objects).shape if u() < 0.5 else _pick(u, SHAPES)
    return f"how many {shape}s are there", NUMBER_WORDS[facts.count(shape=shape)]


EXIST_FORMS = ((False, True, True), (False, False, True), (False, True, False), (True, True, True))


def _q_exists(facts, u):
    """'is there a [size] [colour] shape|object': yes and no with probability 1/2 each."""
    keep = _pick(u, EXIST_FORMS)  # which of (size, colour, shape) the question names
    if u() < 0.5:  # yes: describe an object that is there
        o = _pick(u, facts.objects)
        wanted, answer = (o.size, o.colour, o.shape), "yes"
    else:  # no: draw descriptions until one matches nothing
        for _ in range(50):
            wanted = (_pick(u, SIZES), _pick(u, COLOURS), _pick(u, SHAPES))
            if facts.count(*(w if k else None for w, k in zip(wanted, keep))) == 0:
                break
        else:
            return None
        answer = "no"
    size, colour, shape = (w if k else None for w, k in zip(wanted, keep))
    words = [w for w in (size, colour, shape or "object") if w]
    return "is there " + _article(words[0]) + " " + " ".join(words), answer


def _q_relation(facts, u):
    """'what shape is to the left of the red circle': one object clears the margin, every
    other object is clearly not in that relation (misses it by the margin too)."""
    objs, m, options = facts.objects, facts.margin, []
    for r, ref in enumerate(objs):
        if facts.count(colour=ref.colour, shape=ref.shape) != 1:
            continue
        for t, (rel, words) in enumerate(RELATIONS.items()):
            gaps = [(facts.gaps[(j, r)][t], o) for j, o in enumerate(objs) if j != r]
            hits = [o for g, o in gaps if g >= m]
            if len(hits) == 1 and all(g >= m or g <= -m for g, _ in gaps):
                options.append((f"what shape is {words} the {ref.colour} {ref.shape}",
                                hits[0].shape))
    return _pick(u, options) if options else None


QUESTION_TYPES = (_q_colour, _q_shape, _q_count, _q_exists, _q_relation)


def make_questions(scene: Scene, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (question, answer) pairs; the five templates in a random order, skipping impossible ones
    (counting and existence are always possible, so this ends)."""
    facts, u = _Facts(scene), _Uniforms(rng)
    order = _shuffled(u, QUESTION_TYPES)
    questions, k = [], 0
    while len(questions) < n:
        qa = order[k % len(order)](facts, u)
        k += 1
        if qa is not None and (qa not in questions or k > 8 * n):
            questions.append(qa)
    return questions


def question_type(question: str) -> str:
    """The template a question came from: colour, shape, count, exists or relation (the keys of
    the per-type VQA accuracies)."""
    if question.startswith("what colour"):
        return "colour"
    if question.startswith("how many"):
        return "count"
    if question.startswith("is there"):
        return "exists"
    if any(f" {words} the " in question for words in RELATIONS.values()):
        return "relation"
    return "shape"


# --- 7. The detector: proposals, pixel features, a nearest-centroid classifier ------------------

GRID = 8  # each box is sampled on a GRID x GRID lattice of pixels
RAW_DIM = GRID * GRID + 3 + 3 + 3  # 8x8 silhouette + foreground colour + mean + std


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes (N, 4) and (M, 4) -> (N, M)."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2)
    inter = np.clip(hi - lo, 0, None).prod(-1)  # (N, M)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)  # (N,)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)  # (M,)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


class Detector:
    """A small, deterministic stand-in for Faster R-CNN [UNITER §3.1, Oscar §3].

    features(image, boxes): each box is sampled on an 8x8 lattice of pixels (nearest pixel,
        like a coarse RoI pooling). chroma = max(RGB) - min(RGB) of each sample (objects are
        saturated, backgrounds muted), divided by max(its peak in the box, 0.2), is a coarse
        foreground silhouette (64 numbers); then the chroma-weighted mean colour, the mean and
        the std of the samples (3 each, weight 2). These RAW_DIM = 73 numbers go through a fixed
        Gaussian projection (RAW_DIM, F) / sqrt(RAW_DIM) seeded by DETECTOR_SEED, so F can be
        anything (64, 2048). Only pixels are read, never the scene's labels.
    classify(features): nearest class centroid with a softmax over negative squared distances,
        p_c = softmax_c(-|f - mu_c|^2 / tau). The centroids mu_c (background + 6 shapes) are the
        mean features of proposals on 120 rendered one-object scenes (IoU >= 0.5 with the object:
        its shape, IoU < 0.2: background, others unused, as Faster R-CNN labels its proposals);
        tau = a quarter of the mean squared distance of those samples to their own centroid
        (chosen so that jittered object boxes get a conf near 1 and background boxes a low one,
        as peaked as a trained detector, while the argmax of jittered object boxes still confuses
        circles with hexagons and stars with diamonds; see RESULTS.md).
    The detector depends on (image_size, feature_dim) only, not on the world's seed, like one
    pretrained detector run over every split.
    """

    def __init__(self, image_size: int, feature_dim: int, noise: np.ndarray):
        self.image_size = image_size
        rng = np.random.default_rng([DETECTOR_SEED, feature_dim])
        self.projection = (rng.standard_normal((RAW_DIM, feature_dim))
                           / math.sqrt(RAW_DIM)).astype(np.float32)  # (RAW_DIM, F)
        self.centroids, self.tau = self._fit(noise)  # (C+1, F), scalar

    def proposals(self, scene: Scene, rng: np.random.Generator, n: int) -> np.ndarray:
        """n boxes (n, 4) float32 in pixels: a jittered box of each object first (centre moves
        <= 10 % of the box, sides scale 0.85..1.15), then, for the remaining rows, 60 % rough
        copies of a random object's box (centre moves <= half the box, sides scale 0.6..1.8:
        they overlap it partly) and 40 % background boxes anywhere (sides 10..45 % of S)."""
        S = self.image_size
        gt = np.array([o.box for o in scene.objects] or [(0, 0, S, S)], np.float64)  # (M, 4)
        m = min(len(scene.objects), n)
        u = rng.random((5, n, 2))  # every uniform this needs, in one draw
        src = (u[0, :, 0] * len(gt)).astype(np.int64)  # (n,) the object each copy starts from
        src[:m] = np.arange(m)  # rows < m: each object's own box
        centre = (gt[src, :2] + gt[src, 2:]) * 0.5  # (n, 2)
        half = (gt[src, 2:] - gt[src, :2]) * 0.5  # (n, 2) half width, half height
        own = (np.arange(n) < m)[:, None]  # (n, 1)
        move, low, span = np.where(own, (0.1, 0.85, 0.3), (1.0, 0.6, 1.2)).T[:, :, None]  # (n, 1)
        centre = centre + move * (2 * u[1] - 1) * half  # (n, 2)
        half = half * (low + span * u[2])  # (n, 2)
        loose_half = (0.05 + 0.175 * u[3]) * S  # (n, 2)
        loose = ~own & (u[0, :, 1:] < 0.4)  # (n, 1) rows that become background boxes
        centre = np.where(loose, loose_half + u[4] * (S - 2 * loose_half), centre)  # (n, 2)
        half = np.maximum(np.where(loose, loose_half, half), 1.0)  # >= 2 px wide and high
        centre = np.clip(centre, 1.0, S - 1.0)  # so clipping below keeps >= 2 px
        boxes = np.concatenate([centre - half, centre + half], 1)  # (n, 4) x1, y1, x2, y2
        return np.clip(boxes, 0, S).astype(np.float32)

    def raw_descriptor(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """uint8 (S, S, 3), boxes (N, 4) in pixels -> (N, RAW_DIM) float32 (class docstring)."""
        S, N = image.shape[0], len(boxes)
        t = (np.arange(GRID, dtype=np.float32) + 0.5) / GRID  # (G,) lattice in the unit box
        xs = boxes[:, 0:1] + t * (boxes[:, 2:3] - boxes[:, 0:1])  # (N, G)
        ys = boxes[:, 1:2] + t * (boxes[:, 3:4] - boxes[:, 1:2])  # (N, G)
        xi = np.minimum(xs.astype(np.int64), S - 1)  # boxes lie in [0, S], so only the top clips
        yi = np.minimum(ys.astype(np.int64), S - 1)
        p = image[yi[:, :, None], xi[:, None, :]].reshape(N, GRID * GRID, 3)  # (N, K, 3), K = G^2
        p = p.astype(np.float32) * (1 / 255)
        r, g, b = p[:, :, 0], p[:, :, 1], p[:, :, 2]  # (N, K) each
        chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # (N, K)
        silhouette = chroma / np.maximum(chroma.max(1, keepdims=True), 0.2)  # (N, K) in [0, 1]
        weight = chroma[:, None, :] + 1e-3  # (N, 1, K)
        fg_colour = (weight @ p)[:, 0] / weight.sum(2)  # (N, 3) chroma-weighted mean colour
        average = np.full((1, GRID * GRID), 1 / GRID ** 2, np.float32)  # (1, K): matmul beats .mean
        mean = (average @ p)[:, 0]  # (N, 3)
        std = np.sqrt(np.maximum((average @ (p * p))[:, 0] - mean * mean, 0))  # (N, 3)
        return np.concatenate([silhouette, 2 * fg_colour, 2 * mean, 2 * std], 1)  # (N, RAW_DIM)

    def features(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """(N, F) float32 region features of the pixel boxes (N, 4)."""
        return self.raw_descriptor(image, boxes) @ self.projection  # (N, F)

    def classify(self, features: np.ndarray) -> np.ndarray:
        """(N, F) -> cls_prob (N, C+1), rows sum to 1; column 0 = background."""
        d2 = ((features * features).sum(1, keepdims=True) - 2 * features @ self.centroids.T
              + (self.centroids * self.centroids).sum(1))  # (N, C+1) = |f - mu_c|^2
        logits = -d2 / self.tau
        p = np.exp(logits - logits.max(1, keepdims=True))  # (N, C+1)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)

    def _fit(self, noise: np.ndarray) -> tuple[np.ndarray, float]:
        """Class centroids and temperature from 120 rendered one-object scenes (fixed seed)."""
        rng = np.random.default_rng([DETECTOR_SEED, self.image_size, 1])
        feats, labels = [], []
        for k in range(120):
            scene = sample_scene(rng, self.image_size, 1,
                                 forced=(COLOURS[k // 6 % 6], SHAPES[k % 6]))
            boxes = self.proposals(scene, rng, 12)  # (12, 4)
            iou = box_iou(boxes, np.array([scene.objects[0].box], np.float32))[:, 0]  # (12,)
            label = np.where(iou >= 0.5, 1 + SHAPES.index(scene.objects[0].shape),
                             np.where(iou < 0.2, 0, -1))  # -1 = ambiguous, unused
            feats.append(self.features(render_scene(scene, noise), boxes))
            labels.append(label)
        feats, labels = np.concatenate(feats), np.concatenate(labels)  # (K, F), (K,)
        centroids = np.stack([feats[labels == c].mean(0) for c in range(len(DETECTOR_CLASSES))])
        used = labels >= 0
        spread = ((feats[used] - centroids[labels[used]]) ** 2).sum(-1).mean()
        return centroids.astype(np.float32), float(spread / 4)

    def detect(self, image: np.ndarray, scene: Scene, rng: np.random.Generator, n: int) -> dict:
        """Regions of one image, rows sorted by conf descending (the npz convention above)."""
        boxes = self.proposals(scene, rng, n)  # (N, 4) pixels
        features = self.features(image, boxes)  # (N, F)
        cls_prob = self.classify(features)  # (N, C+1)
        conf = 1.0 - cls_prob[:, 0]  # (N,) P(not background)
        order = np.argsort(-conf, kind="stable")
        cls_prob, conf = cls_prob[order], conf[order]
        best = 1 + cls_prob[:, 1:].argmax(1)  # (N,) best foreground class of each region
        tags = [DETECTOR_CLASSES[c] for c, s in zip(best.tolist(), conf.tolist())
                if s > TAG_THRESHOLD]
        return {"boxes": (boxes[order] / self.image_size).astype(np.float32),  # (N, 4) in [0, 1]
                "features": features[order].astype(np.float32), "conf": conf.astype(np.float32),
                "cls_prob": cls_prob, "tags": tags}


# --- 8. The world and its classification view ---------------------------------------------------

def _split_length(config: WorldConfig, split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
    return {"train": config.n_train, "val": config.n_val, "test": config.n_test}[split]


class World:
    """Split `split` of the world: item i = `example(i)`, a pure function of (seed, split, i)."""

    def __init__(self, config: WorldConfig, split: str):
        self.length = _split_length(config, split)
        self.config, self.split = config, split
        self.noise = noise_texture(config.image_size)  # (2S, 2S, 3)
        self.detector = Detector(config.image_size, config.feature_dim, self.noise)

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.length:
            raise IndexError(f"example {i} out of range for {self.split} ({self.length})")
        return np.random.default_rng([self.config.seed, SPLIT_IDS[self.split], i])

    def _scene(self, rng: np.random.Generator) -> Scene:
        c = self.config
        if self.split == "train" and rng.random() < c.single_object_prob:
            n_objects = 1
        else:
            n_objects = 1 + int(rng.random() * c.max_objects)
        return sample_scene(rng, c.image_size, n_objects)

    def scene(self, i: int) -> Scene:
        """The scene of example i (cheap: nothing is rendered)."""
        return self._scene(self._rng(i))

    def render(self, scene_or_i) -> np.ndarray:
        """uint8 (S, S, 3) image of a Scene or of example i."""
        scene = self.scene(scene_or_i) if isinstance(scene_or_i, (int, np.integer)) else scene_or_i
        return render_scene(scene, self.noise)

    def example(self, i: int, regions: bool = True) -> dict:
        """image (S, S, 3) uint8, captions, scene, questions and, if `regions`, the detector's
        boxes (N, 4), features (N, F), conf (N,), cls_prob (N, C+1) and tags."""
        c = self.config
        rng = self._rng(i)
        scene = self._scene(rng)
        out = {"image": render_scene(scene, self.noise),
               "captions": make_captions(scene, rng, c.n_captions),
               "scene": scene,
               "questions": make_questions(scene, rng, c.n_questions)}
        if regions:  # drawn last, so regions=False leaves everything above unchanged
            out.update(self.detector.detect(out["image"], scene, rng, c.n_regions))
        return out

    __getitem__ = example


class ClassificationWorld:
    """Single-object images labelled by (colour, shape): label = CLASS_NAMES.index("red circle").

    Item i of split s is a pure function of (seed, s, i), drawn from split id 10 + id(s), so it
    never coincides with an example of `World`. Used for CoCa zero-shot and linear probes.
    """

    def __init__(self, config: WorldConfig, split: str):
        self.length = _split_length(config, split)
        self.config, self.split = config, split
        self.noise = noise_texture(config.image_size)  # (2S, 2S, 3)

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        """The one-object scene of item i; its label is CLASS_NAMES.index(colour + " " + shape)."""
        if not 0 <= i < self.length:
            raise IndexError(f"item {i} out of range for {self.split} ({self.length})")
        rng = np.random.default_rng([self.config.seed,
                                     CLASSIFICATION_SPLIT_OFFSET + SPLIT_IDS[self.split], i])
        colour, shape = CLASS_NAMES[int(rng.random() * len(CLASS_NAMES))].split()
        return sample_scene(rng, self.config.image_size, 1, forced=(colour, shape))

    def item(self, i: int) -> tuple[np.ndarray, int]:
        """(image uint8 (S, S, 3), label in 0..35)."""
        scene = self.scene(i)
        obj = scene.objects[0]
        return render_scene(scene, self.noise), CLASS_NAMES.index(f"{obj.colour} {obj.shape}")

    __getitem__ = item


# --- 9. Export to COCO captions + per-image region npz ------------------------------------------

def export_classification(config: WorldConfig, split: str, out_dir, n: int) -> Path:
    """The first n items of ClassificationWorld(split) as an image folder: out_dir/<class name,
    "_" for the space>/<i:06d>.png (shared.folders.ImageFolder reads it back). Returns out_dir."""
    out, world = Path(out_dir), ClassificationWorld(config, split)
    for i in range(min(n, len(world))):
        image, label = world.item(i)
        folder = out / CLASS_NAMES[label].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:06d}.png", compress_level=1)
    return out


def export_split(world: World, out_dir, n: int | None = None) -> Path:
    """Write the first n examples (all by default) of a split in the real-data formats:

        out_dir/images/<image_id:012d>.png        image_id = example index i
        out_dir/captions_<split>.json             COCO captions: images + annotations
        out_dir/dataset_<split>.json              the same as a Karpathy split file
        out_dir/vqa_questions_<split>.json        VQA v2 questions and annotations (_export_vqa)
        out_dir/vqa_annotations_<split>.json
        out_dir/instances_<split>.json            COCO instances: each object's box (x, y, w, h in
                                                  pixels) and shape (the detector's classes)
        out_dir/regions/<image_id:012d>.npz       features f16 (N, F), boxes f32 (N, 4) in [0, 1],
                                                  conf f32 (N,), cls_prob f16 (N, C+1), tags (K,)
                                                  unicode, image_hw int32 (2,); rows by conf desc.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "regions").mkdir(parents=True, exist_ok=True)
    n = len(world) if n is None else min(n, len(world))
    images, annotations = [], []
    for i in range(n):
        ex = world.example(i, regions=True)
        H, W = ex["image"].shape[:2]
        name = f"{i:012d}"
        Image.fromarray(ex["image"]).save(out / "images" / f"{name}.png", compress_level=1)
        images.append({"id": i, "file_name": f"{name}.png", "height": H, "width": W})
        for caption in ex["captions"]:
            annotations.append({"id": len(annotations), "image_id": i, "caption": caption})
        np.savez(out / "regions" / f"{name}.npz",
                 features=ex["features"].astype(np.float16), boxes=ex["boxes"],
                 conf=ex["conf"], cls_prob=ex["cls_prob"].astype(np.float16),
                 tags=np.array(ex["tags"], dtype=np.str_).reshape(-1),
                 image_hw=np.array([H, W], dtype=np.int32))
    info = {"description": f"synthetic world, split {world.split}", "seed": world.config.seed}
    with open(out / f"captions_{world.split}.json", "w") as f:
        json.dump({"info": info, "licenses": [], "images": images,
                   "annotations": annotations}, f)
    sentences = {image["id"]: [] for image in images}
    for a in annotations:
        sentences[a["image_id"]].append({"raw": a["caption"]})
    karpathy = [{"filepath": "images", "filename": image["file_name"], "imgid": image["id"],
                 "split": world.split, "sentences": sentences[image["id"]]} for image in images]
    with open(out / f"dataset_{world.split}.json", "w") as f:  # the Karpathy split layout
        json.dump({"dataset": "world", "images": karpathy}, f)
    _export_vqa(world, out, n)
    objects = []  # ground-truth boxes: the scene's objects, x2 and y2 exclusive
    for i in range(n):
        for o in world.scene(i).objects:
            x1, y1, x2, y2 = o.box
            objects.append({"id": len(objects), "image_id": i, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                            "category_id": DETECTOR_CLASSES.index(o.shape)})
    with open(out / f"instances_{world.split}.json", "w") as f:
        json.dump({"images": images, "annotations": objects, "categories": [
            {"id": c, "name": DETECTOR_CLASSES[c]} for c in range(1, len(DETECTOR_CLASSES))]}, f)
    return out


def _export_vqa(world: World, out: Path, n: int) -> None:
    """The questions of the first n images as VQA v2's two files (shared.vqa reads them):
    vqa_questions_<split>.json and vqa_annotations_<split>.json, each world answer given by all
    10 "annotators", answer_type from the answer (yes/no, number, other), question_type the
    template (question_type)."""
    questions, annotations = [], []
    for i in range(n):
        for question, answer in world.example(i, regions=False)["questions"]:
            qid = len(questions)
            kind = ("yes/no" if answer in ("yes", "no") else
                    "number" if answer in NUMBER_WORDS else "other")
            questions.append({"image_id": i, "question": question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": i, "answer_type": kind,
                                "question_type": question_type(question),
                                "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes",
                                             "answer_id": k + 1} for k in range(10)]})
    with open(out / f"vqa_questions_{world.split}.json", "w") as f:
        json.dump({"data_subtype": world.split, "questions": questions}, f)
    with open(out / f"vqa_annotations_{world.split}.json", "w") as f:
        json.dump({"data_subtype": world.split, "annotations": annotations}, f)


# --- 10. Benchmark and a look at a few examples -------------------------------------------------

def _benchmark(n: int, image_size: int, feature_dim: int) -> None:
    """Print examples/s (single process) with and without region features."""
    start = time.perf_counter()
    world = World(WorldConfig(image_size=image_size, feature_dim=feature_dim), "train")
    print(f"World init: {time.perf_counter() - start:.2f} s (noise texture + detector fit)")
    for regions in (True, False):
        world.example(0, regions)  # warm up
        start = time.perf_counter()
        for i in range(n):
            world.example(i, regions)
        rate = n / (time.perf_counter() - start)
        print(f"{image_size} px, regions={regions}: {rate:,.0f} examples/s")


def retrieval_ceilings(truth) -> dict[str, float]:
    """The R@1 that two idealised scorers of N (caption, image) pairs would expect, from the
    truth table alone: a yardstick for the retrieval metrics on the synthetic world.

    OURS (the world lets a program check a caption, which real data does not). truth: (N, N)
    bool, truth[i, j] = caption i is true of image j; caption i was written for image i, so the
    diagonal must be True. With

        k_i = Σ_j truth[i, j]   (how many images caption i is true of)
        m_j = Σ_i truth[i, j]   (how many captions are true of image j)

      truth-only: a scorer that knows only true / false ranks the true candidates in random
        order:  t2i = mean_i 1 / k_i,   i2t = mean_j 1 / m_j.
      specific: it also prefers, for an image, the true captions with the smallest k (the most
        specific ones) and, for a caption, the true images with the smallest m (the ones fewest
        captions fit); ties in random order. This is roughly what a calibrated ITM log-odds
        does (it estimates log p(caption | image) / p(caption)); a heuristic, not a bound.

    Returns {"t2i_truth_only", "i2t_truth_only", "t2i_specific", "i2t_specific"}, each the
    expected R@1 in [0, 1].

    Worked example: truth = [[1, 1], [0, 1]] (caption 0 fits both images, caption 1 only
    image 1): k = [2, 1], m = [1, 2]; t2i_truth_only = (1/2 + 1/1) / 2 = 0.75; image 1's true
    captions are {0, 1} with k = {2, 1}, so the specific scorer picks caption 1 for it, right,
    and i2t_specific = 1.
    """
    truth = np.asarray(truth, dtype=bool)
    if truth.ndim != 2 or truth.shape[0] != truth.shape[1] or truth.shape[0] == 0:
        raise ValueError(f"truth must be a non-empty square (captions, images) table, got shape "
                         f"{truth.shape}")
    if not truth.diagonal().all():
        raise ValueError("truth's diagonal must be True: caption i is written for image i")
    k, m = truth.sum(1), truth.sum(0)  # (N,) images per caption, (N,) captions per image

    def specific(table: np.ndarray, fit: np.ndarray) -> float:
        """Row r ranks its true columns by fit (smaller first); expected R@1 of column r."""
        hits = []
        for r, row in enumerate(table):
            candidates = np.flatnonzero(row)
            winners = candidates[fit[candidates] == fit[candidates].min()]
            hits.append(float(r in winners) / len(winners))
        return float(np.mean(hits))

    return {"t2i_truth_only": float(np.mean(1.0 / k)), "i2t_truth_only": float(np.mean(1.0 / m)),
            "t2i_specific": specific(truth, m), "i2t_specific": specific(truth.T, k)}


def _retrieval_ceilings(n: int, image_size: int, feature_dim: int, seed: int = 0) -> None:
    """retrieval_ceilings on the first n test examples and their first captions: the pairs that
    UNITER's and Oscar's retrieval evaluation score."""
    world = World(WorldConfig(seed=seed, image_size=image_size, feature_dim=feature_dim), "test")
    examples = [world.example(i, regions=False) for i in range(min(n, len(world)))]
    truth = [[is_true(a["captions"][0], b["scene"]) for b in examples] for a in examples]
    ceilings = retrieval_ceilings(truth)
    per_caption = np.asarray(truth).sum(1).mean()
    print(f"test split, {len(examples)} images x their first caption: a caption is true of "
          f"{per_caption:.2f} of the images on average")
    for name, value in ceilings.items():
        print(f"  {name:<15} expected R@1 {100 * value:.1f} %")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The synthetic world: benchmark or show examples.")
    parser.add_argument("--bench", action="store_true", help="measure examples/s")
    parser.add_argument("--retrieval_ceilings", action="store_true",
                        help="expected R@1 of idealised scorers on the first --n test pairs")
    parser.add_argument("--n", type=int, default=3000, help="examples to time or score")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--feature_dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (train.py --seed)")
    args = parser.parse_args()
    if args.bench:
        _benchmark(args.n, args.image_size, args.feature_dim)
    elif args.retrieval_ceilings:
        _retrieval_ceilings(args.n, args.image_size, args.feature_dim, args.seed)
    else:
        world = World(WorldConfig(image_size=args.image_size, feature_dim=args.feature_dim), "val")
        for i in range(3):
            ex = world.example(i)
            print(f"--- example {i}: {[(o.size, o.colour, o.shape) for o in ex['scene'].objects]}")
            print("\n".join(ex["captions"]))
            print(ex["questions"], ex["tags"])
