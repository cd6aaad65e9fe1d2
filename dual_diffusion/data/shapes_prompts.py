"""Text-to-image prompt sets of the shapes world in GenEval's six categories.

Each PromptSpec says what an image must contain to pass (GenEval's binary,
per-prompt criterion) and carries a ground-truth scene that satisfies it (what
`--oracle` renders):
- single_object: "a triangle"                       -> at least one triangle
- two_object:    "a circle and a square"            -> at least one of each
- counting:      "three squares"                    -> exactly three squares
- colors:        "a blue circle"                    -> a circle, and it is blue
- position:      "a red circle left of a blue square" -> both, and the relation
- color_attr:    "a red circle and a blue square"   -> both with those colors

A world (shapes.World) holds only some of them: `categories(world)` lists those
whose prompts describe a scene of the world (a one-object world: single_object and
colors), and prompts use the world's colors, shapes, counts and sizes.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from dual_diffusion.data import shapes

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclasses.dataclass(frozen=True)
class Want:
    shape: str
    color: str | None = None  # None: any color
    count: int | None = None  # None: at least one; else exactly this many (of shape [+ color])


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    category: str
    prompt: str
    wants: tuple[Want, ...]
    relation: str | None = None  # 'left' | 'right' | 'above' | 'below': wants[0] <rel> wants[1]
    scene: shapes.Scene | None = None  # an oracle scene that satisfies the spec


def _pick(rng: np.random.Generator, names, n: int) -> list[str]:
    return [str(v) for v in rng.choice(list(names), size=n, replace=False)]


def categories(world: shapes.World = shapes.FULL_WORLD) -> tuple[str, ...]:
    """The categories whose prompts describe scenes of `world`, in CATEGORIES' order."""
    one = world.min_objects == 1
    two = world.min_objects <= 2 <= world.max_objects
    many_shapes, many_colors = len(world.shapes) >= 2, len(world.colors) >= 2
    holds = {"single_object": one, "colors": one, "counting": world.max_objects >= 2,
             "two_object": two and many_shapes, "position": two and many_shapes and many_colors,
             "color_attr": two and many_shapes and many_colors}
    return tuple(c for c in CATEGORIES if holds[c])


def make_prompt(category: str, rng: np.random.Generator, world: shapes.World = shapes.FULL_WORLD) -> PromptSpec:
    """One prompt of `category` with its oracle scene in `world`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown GenEval category {category!r}; expected one of {CATEGORIES}")
    if category not in categories(world):
        raise ValueError(f"GenEval category {category!r} does not apply to {world}; expected one of "
                         f"{categories(world)}")
    if category == "single_object":
        (shape,), (color,) = _pick(rng, world.shapes, 1), _pick(rng, world.colors, 1)
        return PromptSpec(category, shapes._phrase(1, None, shape), (Want(shape),),
                          scene=shapes.place_objects(rng, [(color, shape)], world=world))
    if category == "two_object":
        s1, s2 = _pick(rng, world.shapes, 2)
        c1, c2 = _pick(rng, world.colors, 2)
        return PromptSpec(category, f"{shapes._phrase(1, None, s1)} and {shapes._phrase(1, None, s2)}",
                          (Want(s1), Want(s2)), scene=shapes.place_objects(rng, [(c1, s1), (c2, s2)], world=world))
    if category == "counting":
        (shape,), (color,) = _pick(rng, world.shapes, 1), _pick(rng, world.colors, 1)
        n = int(rng.integers(max(2, world.min_objects), world.max_objects + 1))
        return PromptSpec(category, shapes._phrase(n, None, shape), (Want(shape, count=n),),
                          scene=shapes.place_objects(rng, [(color, shape)] * n, world=world))
    if category == "colors":
        (shape,), (color,) = _pick(rng, world.shapes, 1), _pick(rng, world.colors, 1)
        return PromptSpec(category, shapes._phrase(1, color, shape), (Want(shape, color),),
                          scene=shapes.place_objects(rng, [(color, shape)], world=world))
    s1, s2 = _pick(rng, world.shapes, 2)  # position and color_attr: two objects with colors
    c1, c2 = _pick(rng, world.colors, 2)
    wants = (Want(s1, c1), Want(s2, c2))
    if category == "color_attr":
        prompt = f"{shapes._phrase(1, c1, s1)} and {shapes._phrase(1, c2, s2)}"
        return PromptSpec(category, prompt, wants, scene=shapes.place_objects(rng, [(c1, s1), (c2, s2)], world=world))
    rel = str(rng.choice(["left", "right", "above", "below"]))
    base, flip = {"left": ("left", False), "right": ("left", True),
                  "above": ("above", False), "below": ("above", True)}[rel]
    kinds = [(c2, s2), (c1, s1)] if flip else [(c1, s1), (c2, s2)]
    scene = shapes.place_objects(rng, kinds, base, world)
    word = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[rel]
    prompt = f"{shapes._phrase(1, c1, s1)} {word} {shapes._phrase(1, c2, s2)}"
    return PromptSpec(category, prompt, wants, relation=rel, scene=scene)


def t2i_prompt_set(seed: int, per_category: int, world: shapes.World = shapes.FULL_WORLD) -> list[PromptSpec]:
    """per_category prompts of each category that applies to `world`, deterministic in seed."""
    rng = np.random.default_rng([seed, 7])
    return [make_prompt(c, rng, world) for c in categories(world) for _ in range(per_category)]
