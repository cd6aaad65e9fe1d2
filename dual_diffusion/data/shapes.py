"""The built-in "shapes" world: deterministic scenes, exact renders, captions, QA.

Record i of seed s is a function of (s, i) alone (`np.random.default_rng([s, i])`),
so the world needs no files and every process can render any record.

A scene is flat objects (circles, squares, triangles in saturated colors) on a
plain gray background, in resolution-free unit coordinates; `render` draws it at
any size. A `World` says which colors and shapes occur, how many objects a scene
holds and how big they are: the full world (`World()`: 1-4 objects, 3 shapes, 8
colors, radius 0.14-0.18) or a smaller one (the CPU demo's: one larger object, a
few colors). Sizes and gaps are chosen so that objects stay separable and their
shapes readable at 32 px (smallest object about 8 px across, gaps >= 2 px), which
is what the exact evaluator (shapes_eval.py) relies on.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (240, 220, 20),
    "green": (30, 170, 50),
    "cyan": (20, 210, 220),
    "blue": (30, 60, 230),
    "purple": (140, 40, 190),
    "pink": (255, 120, 200),
}
BACKGROUND = (128, 128, 128)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MIN_RADIUS, MAX_RADIUS = 0.14, 0.18
# Boxes of two objects are at least this far apart (2.1 px at 32 px).
GAP = 0.065
# A left/right or above/below relation is only stated with this much separation.
RELATION_MARGIN = 0.15
SQUARE_HALF_SIDE = 0.85  # as a fraction of r, so squares are not much bigger than circles
MAX_OBJECTS = 4  # number words and placement are sized for this many


@dataclasses.dataclass(frozen=True)
class World:
    """Which scenes occur: colors and shapes (subsets of COLORS / SHAPES, in this order of
    sampling), objects per scene, and the objects' radius range (unit coordinates). The
    defaults are the full world; every default record, caption and prompt set is the one
    this module made before worlds were configurable."""

    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    min_radius: float = MIN_RADIUS
    max_radius: float = MAX_RADIUS
    # A single object's centre is drawn from this fraction of the free range around the image centre
    # (1: anywhere the object fits; 0: always centred).
    spread: float = 1.0

    def __post_init__(self):
        for name, value in (("colors", self.colors), ("shapes", self.shapes)):
            object.__setattr__(self, name, tuple(str(v) for v in value))  # lists from config.json
        errors = self._errors()
        if errors:
            raise ValueError("; ".join(errors))

    def _errors(self) -> list[str]:
        out = []
        for name, known in (("colors", tuple(COLORS)), ("shapes", SHAPES)):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values) or set(values) - set(known):
                out.append(f"{name}={values}: expected distinct names from {known}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            out.append(f"min_objects={self.min_objects}, max_objects={self.max_objects}: expected "
                       f"1 <= min_objects <= max_objects <= {MAX_OBJECTS}")
        # Above 0.25 a circle covers more than the reader's largest object (shapes_eval.MAX_AREA).
        if not 0.1 <= self.min_radius <= self.max_radius <= 0.25:
            out.append(f"min_radius={self.min_radius}, max_radius={self.max_radius}: expected "
                       "0.1 <= min_radius <= max_radius <= 0.25")
        if not 0.0 <= self.spread <= 1.0 or (self.spread < 1 and self.max_objects > 1):
            out.append(f"spread={self.spread}: expected a number in [0, 1], below 1 only with max_objects=1")
        # max_objects of the largest size must fit side by side in a square grid, with gaps and margins.
        k = math.ceil(math.sqrt(self.max_objects))
        if k * 2 * self.max_radius + (k - 1) * GAP + 0.04 > 1:
            out.append(f"max_objects={self.max_objects} of max_radius={self.max_radius} do not fit in the image")
        return out

    @classmethod
    def from_config(cls, config) -> "World":
        """From a config's `data.shapes_world` (a ConfigDict, or the dict of a workdir's config.json);
        None (a run from before worlds were configurable) is the full world."""
        if config is None:
            return cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - fields
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; expected {sorted(fields)}")
        return cls(**{k: config[k] for k in config})

    def to_config(self) -> dict:
        return dataclasses.asdict(self)


FULL_WORLD = World()


def world_of_run(config) -> World:
    """The world a training config draws from (`data.shapes_world`; a ConfigDict, or the dict of a
    workdir's config.json); the full world when it names none."""
    return World.from_config((config.get("data") or {}).get("shapes_world"))


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: float  # centre, unit coordinates (0 = left / top)
    y: float
    r: float  # half extent of the bounding box before the square's shrink

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def counts(self) -> Counter:
        """(color, shape) -> count."""
        return Counter((o.color, o.shape) for o in self.objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, color: str | None, shape: str) -> str:
    noun = shape if count == 1 else shape + "s"
    words = ([color] if color else []) + [noun]
    quantity = _article(words[0]) if count == 1 else NUMBER_WORDS[count]
    return " ".join([quantity] + words)


def _fits(obj: Obj, placed: list[Obj]) -> bool:
    for other in placed:
        need = obj.r + other.r + GAP
        if abs(obj.x - other.x) < need and abs(obj.y - other.y) < need:
            return False
    return True


def place_objects(rng: np.random.Generator, kinds: list[tuple[str, str]],
                  relation: str | None = None, world: World = FULL_WORLD) -> Scene:
    """Places (color, shape) objects of the world's sizes without overlap; `relation`
    ('left'|'above') forces object 0 clearly left of / above object 1."""
    for _ in range(200):
        placed: list[Obj] = []
        for color, shape in kinds:
            for _ in range(100):
                r = float(rng.uniform(world.min_radius, world.max_radius))
                lo, hi = r + 0.02, 1 - r - 0.02
                if world.spread < 1:  # (the full spread keeps the bounds, and so the draws, of the full world)
                    lo, hi = 0.5 - world.spread * (0.5 - lo), 0.5 + world.spread * (0.5 - lo)
                x, y = (float(v) for v in rng.uniform(lo, hi, size=2))
                obj = Obj(shape, color, round(x, 4), round(y, 4), round(r, 4))
                if _fits(obj, placed):
                    placed.append(obj)
                    break
            else:
                break
        if len(placed) != len(kinds):
            continue
        if relation is not None:
            a, b = placed[0], placed[1]
            delta = (b.x - a.x) if relation == "left" else (b.y - a.y)
            if delta < RELATION_MARGIN:
                continue
        return Scene(tuple(placed))
    raise RuntimeError(f"could not place objects {kinds} with relation={relation}")


def sample_scene(rng: np.random.Generator, world: World = FULL_WORLD) -> Scene:
    """A random scene of the world; repeats (color, shape) often so counting captions occur."""
    n = int(rng.integers(world.min_objects, world.max_objects + 1))
    kinds: list[tuple[str, str]] = []
    for _ in range(n):
        if kinds and rng.random() < 0.4:
            kinds.append(kinds[int(rng.integers(len(kinds)))])
        else:
            kinds.append((str(rng.choice(list(world.colors))), str(rng.choice(world.shapes))))
    return place_objects(rng, kinds, world=world)


def render(scene: Scene, size: int) -> np.ndarray:
    """uint8 (size, size, 3): exact (aliased) fill of every object at pixel centres."""
    image = np.empty((size, size, 3), np.uint8)
    image[...] = BACKGROUND
    centres = (np.arange(size) + 0.5) / size
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    for obj in scene.objects:
        dx, dy = xs - obj.x, ys - obj.y
        if obj.shape == "circle":
            inside = dx * dx + dy * dy <= obj.r * obj.r
        elif obj.shape == "square":
            h = SQUARE_HALF_SIDE * obj.r
            inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        elif obj.shape == "triangle":  # apex up, base at y + r
            depth = dy + obj.r
            inside = (depth >= 0) & (dy <= obj.r) & (np.abs(dx) <= depth / 2)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")
        image[inside] = COLORS[obj.color]
    return image


# ----------------------------------------------------------------- captions
def relation_of(scene: Scene) -> tuple[int, str, int] | None:
    """(i, 'left'|'above', j) for a 2-object scene with distinct kinds and a clear
    separation, else None. Horizontal relations are preferred."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    if (a.color, a.shape) == (b.color, b.shape):
        return None
    if abs(a.x - b.x) >= RELATION_MARGIN:
        return (0, "left", 1) if a.x < b.x else (1, "left", 0)
    if abs(a.y - b.y) >= RELATION_MARGIN:
        return (0, "above", 1) if a.y < b.y else (1, "above", 0)
    return None


def list_caption(scene: Scene, with_colors: bool = True) -> str:
    """'two red circles and a blue square' (groups in order of first appearance)."""
    groups: dict[tuple, int] = {}
    for o in scene.objects:
        key = (o.color if with_colors else None, o.shape)
        groups[key] = groups.get(key, 0) + 1
    phrases = [_phrase(n, color, shape) for (color, shape), n in groups.items()]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def relation_caption(scene: Scene, relation: tuple[int, str, int], flip: bool = False) -> str:
    """'a green triangle left of a yellow circle' (flip: '... right of ...' / 'below')."""
    i, rel, j = relation
    a, b = scene.objects[i], scene.objects[j]
    if flip:
        a, b, rel = b, a, {"left": "right", "above": "below"}[rel]
    word = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[rel]
    return f"{_phrase(1, a.color, a.shape)} {word} {_phrase(1, b.color, b.shape)}"


def caption(scene: Scene, rng: np.random.Generator, colorless_prob: float = 0.0) -> str:
    """One caption of the scene from the templates (list, relation, colorless list)."""
    if colorless_prob and rng.random() < colorless_prob:
        return list_caption(scene, with_colors=False)
    rel = relation_of(scene)
    if rel is not None and rng.random() < 0.5:
        return relation_caption(scene, rel, flip=bool(rng.random() < 0.5))
    return list_caption(scene)


# ----------------------------------------------------------------------- QA
def questions(scene: Scene, world: World = FULL_WORLD) -> list[tuple[str, str]]:
    """Every (question, answer) pair the scene supports without ambiguity, about the world's
    shapes and colors (a "no" for each present kind: the same shape in another of its colors).
    Counting questions only where the world has counts (max_objects > 1), as the t2i categories."""
    objs = scene.objects
    shape_count = Counter(o.shape for o in objs)
    color_count = Counter(o.color for o in objs)
    kinds = scene.counts()
    qa: list[tuple[str, str]] = []
    for o in objs:
        if shape_count[o.shape] == 1:
            qa.append((f"what color is the {o.shape}?", o.color))
        if color_count[o.color] == 1:
            qa.append((f"what shape is the {o.color} object?", o.shape))
    if world.max_objects > 1:  # with one object, "how many squares" is "is there a square" in other words
        for shape in world.shapes:
            qa.append((f"how many {shape}s are there?", NUMBER_WORDS[shape_count[shape]]))
    for color, shape in sorted(kinds):
        qa.append((f"is there {_article(color)} {color} {shape}?", "yes"))
    palette = list(world.colors)
    for color, shape in sorted(kinds):  # as many absent kinds as present: balanced yes/no
        k = palette.index(color) if color in palette else -1
        absent = next((palette[(k + d) % len(palette)] for d in range(1, len(palette) + 1)
                       if (palette[(k + d) % len(palette)], shape) not in kinds), None)
        if absent is not None:  # None: every color of the world is present in this shape
            qa.append((f"is there {_article(absent)} {absent} {shape}?", "no"))
    rel = relation_of(scene)
    if rel is not None:
        i, r, j = rel
        a, b = objs[i], objs[j]
        if r == "left":
            qa.append((f"which is further left, the {a.name} or the {b.name}?", a.name))
            qa.append((f"is the {b.name} left of the {a.name}?", "no"))
            qa.append((f"is the {a.name} left of the {b.name}?", "yes"))
        else:
            qa.append((f"which is higher, the {b.name} or the {a.name}?", a.name))
            qa.append((f"is the {a.name} above the {b.name}?", "yes"))
            qa.append((f"is the {b.name} above the {a.name}?", "no"))
    return qa


def scene_record(seed: int, index: int, world: World = FULL_WORLD) -> Scene:
    """Record `index` of the world's stream `seed`."""
    return sample_scene(np.random.default_rng([seed, index]), world)


def shapes_captions_corpus(seed: int, n: int, world: World = FULL_WORLD) -> list[str]:
    """Every caption/question/answer text of n scenes of the world (plus the VQA prompt
    words), to train the demo's tiny SentencePiece tokenizer."""
    from dual_diffusion.data.text_layout import vqa_prompt

    texts: list[str] = []
    texts += [f"{c} {s}" for c in world.colors for s in world.shapes] + list(NUMBER_WORDS)
    for i in range(n):
        scene = scene_record(seed, i, world)
        rng = np.random.default_rng([seed, i, 1])
        texts.append(list_caption(scene))
        texts.append(list_caption(scene, with_colors=False))
        texts.append(caption(scene, rng))
        rel = relation_of(scene)
        if rel is not None:
            texts += [relation_caption(scene, rel), relation_caption(scene, rel, flip=True)]
        for q, a in questions(scene, world):
            texts += [vqa_prompt(q), a]
    return texts
