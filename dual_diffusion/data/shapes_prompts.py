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


def _colors(rng, n):
    return [str(c) for c in rng.choice(list(shapes.COLORS), size=n, replace=False)]


def _shapes(rng, n):
    return [str(s) for s in rng.choice(shapes.SHAPES, size=n, replace=False)]


def make_prompt(category: str, rng: np.random.Generator) -> PromptSpec:
    """One prompt of `category` with its oracle scene."""
    if category == "single_object":
        (shape,), (color,) = _shapes(rng, 1), _colors(rng, 1)
        return PromptSpec(category, shapes._phrase(1, None, shape), (Want(shape),),
                          scene=shapes.place_objects(rng, [(color, shape)]))
    if category == "two_object":
        s1, s2 = _shapes(rng, 2)
        c1, c2 = _colors(rng, 2)
        return PromptSpec(category, f"{shapes._phrase(1, None, s1)} and {shapes._phrase(1, None, s2)}",
                          (Want(s1), Want(s2)), scene=shapes.place_objects(rng, [(c1, s1), (c2, s2)]))
    if category == "counting":
        (shape,), (color,) = _shapes(rng, 1), _colors(rng, 1)
        n = int(rng.integers(2, 5))
        return PromptSpec(category, shapes._phrase(n, None, shape), (Want(shape, count=n),),
                          scene=shapes.place_objects(rng, [(color, shape)] * n))
    if category == "colors":
        (shape,), (color,) = _shapes(rng, 1), _colors(rng, 1)
        return PromptSpec(category, shapes._phrase(1, color, shape), (Want(shape, color),),
                          scene=shapes.place_objects(rng, [(color, shape)]))
    if category in ("position", "color_attr"):
        s1, s2 = _shapes(rng, 2)
        c1, c2 = _colors(rng, 2)
        wants = (Want(s1, c1), Want(s2, c2))
        if category == "color_attr":
            prompt = f"{shapes._phrase(1, c1, s1)} and {shapes._phrase(1, c2, s2)}"
            return PromptSpec(category, prompt, wants, scene=shapes.place_objects(rng, [(c1, s1), (c2, s2)]))
        rel = str(rng.choice(["left", "right", "above", "below"]))
        base, flip = {"left": ("left", False), "right": ("left", True),
                      "above": ("above", False), "below": ("above", True)}[rel]
        kinds = [(c2, s2), (c1, s1)] if flip else [(c1, s1), (c2, s2)]
        scene = shapes.place_objects(rng, kinds, relation=base)
        word = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[rel]
        prompt = f"{shapes._phrase(1, c1, s1)} {word} {shapes._phrase(1, c2, s2)}"
        return PromptSpec(category, prompt, wants, relation=rel, scene=scene)
    raise ValueError(f"unknown GenEval category {category!r}; expected one of {CATEGORIES}")


def t2i_prompt_set(seed: int, per_category: int) -> list[PromptSpec]:
    """per_category prompts of each category, deterministic in seed."""
    rng = np.random.default_rng([seed, 7])
    return [make_prompt(c, rng) for c in CATEGORIES for _ in range(per_category)]
