"""Exact evaluator of the shapes world: no learned model, only color and geometry.

Reading an image: every pixel goes to the nearest palette color (or to the
background, or to "unknown" when it is far from all of them); each color's
4-connected components are objects when their area is plausible; the shape comes
from the ideal circle/square/triangle fitted to a component's
bounding box that overlaps it best (IoU). This reads renders exactly at any
size from 32 px up (the demo world's larger single objects from 16 px: 1.0 on 400 renders), and
gives nothing on noise or on a single flat color.

Scores: `evaluate_t2i` (GenEval-style: a prompt passes or fails; per category and
"overall" = mean of the categories), `evaluate_captions` (the scene a caption
describes vs the truth), `evaluate_vqa` (exact match after normalisation).
The reader always knows the full palette and all three shapes, whatever world
(shapes.World) the evaluation sets are drawn from: a color or shape outside the
world reads as itself, and counts as wrong.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter

import numpy as np
from scipy import ndimage

from dual_diffusion.data import shapes
from dual_diffusion.data.shapes import shapes_captions_corpus  # noqa: F401  (re-exported)
from dual_diffusion.data.shapes_prompts import (CATEGORIES, PromptSpec, Want, categories,  # noqa: F401
                                                t2i_prompt_set)

_NAMES = ("background",) + tuple(shapes.COLORS)
_PALETTE = np.array([shapes.BACKGROUND] + list(shapes.COLORS.values()), np.float32)
MAX_COLOR_DISTANCE = 70.0   # farther from every palette entry: "unknown"
MIN_AREA, MAX_AREA = 0.01, 0.2  # object area as a fraction of the image


@dataclasses.dataclass(frozen=True)
class Detection:
    color: str
    shape: str
    x: float  # centroid, unit coordinates
    y: float
    area: float  # fraction of the image


def _classify_shape(mask: np.ndarray) -> str | None:
    """Best of the three ideal shapes fitted to the component's bounding box, by IoU.

    Template fitting (rather than a fill-ratio threshold) keeps 8-px circles from
    reading as squares or triangles at 32 px."""
    bh, bw = mask.shape
    if not 0.6 <= bw / bh <= 1.67:
        return None
    # Pixel centres relative to the box centre, in pixels (y grows downwards).
    y = np.arange(bh)[:, None] + 0.5 - bh / 2
    x = np.arange(bw)[None, :] + 0.5 - bw / 2
    iou = lambda t: (t & mask).sum() / (t | mask).sum()  # noqa: E731
    ious = {"square": iou(np.ones((bh, bw), bool)), "circle": 0.0, "triangle": 0.0}
    # A shape's true extent exceeds its pixels' box by up to a pixel: try a few pads.
    for pad in (0.0, 0.3, 0.6):
        hy, hx = bh / 2 + pad, bw / 2 + pad
        ious["circle"] = max(ious["circle"], iou((x / hx) ** 2 + (y / hy) ** 2 <= 1))
        depth = (y + hy) / (2 * hy)  # 0 at the apex (top) .. 1 at the base
        ious["triangle"] = max(ious["triangle"], iou(np.abs(x) <= depth * hx))
    best = max(ious, key=ious.get)
    return best if ious[best] >= 0.7 else None


def detect_objects(image: np.ndarray) -> list[Detection]:
    """Objects in one uint8 (H, W, 3) image."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"detect_objects: expected (H, W, 3), got {image.shape}")
    h, w, _ = image.shape
    pixels = image.reshape(-1, 3).astype(np.float32)
    # |x - p|^2 expanded, one matmul instead of an (H, W, K, 3) difference.
    d2 = ((pixels ** 2).sum(-1, keepdims=True) - 2 * pixels @ _PALETTE.T
          + (_PALETTE ** 2).sum(-1)).reshape(h, w, -1)
    label = d2.argmin(-1)
    label[d2.min(-1) > MAX_COLOR_DISTANCE ** 2] = -1
    found = []
    for k in range(1, len(_NAMES)):
        comps, n = ndimage.label(label == k)
        if n == 0:
            continue
        for i, box in enumerate(ndimage.find_objects(comps), start=1):
            mask = comps[box] == i
            area = int(mask.sum())
            if not MIN_AREA * h * w <= area <= MAX_AREA * h * w:
                continue
            shape = _classify_shape(mask)
            if shape is None:
                continue
            # Box centre, not centroid: that is where the world puts an object (a
            # triangle's centroid sits r/3 below it), so relations read back exactly.
            found.append(Detection(_NAMES[k], shape, (box[1].start + box[1].stop) / (2 * w),
                                   (box[0].start + box[0].stop) / (2 * h), area / (h * w)))
    return found


def scene_from_image(image: np.ndarray) -> shapes.Scene:
    """The scene as read from the pixels (radius from the box area, approximately)."""
    return shapes.Scene(tuple(shapes.Obj(d.shape, d.color, d.x, d.y, float(np.sqrt(d.area)) / 2)
                              for d in detect_objects(image)))


def answer_from_image(image: np.ndarray, question: str, world: shapes.World = shapes.FULL_WORLD) -> str:
    """The world's own answer to `question` about the scene read from the image
    ('' when the question does not apply to what is seen)."""
    return dict(shapes.questions(scene_from_image(image), world)).get(question, "")


def _matches(det: Detection, want: Want) -> bool:
    return det.shape == want.shape and (want.color is None or det.color == want.color)


def _holds(a, b, relation: str) -> bool:
    """Relation between two things with .x/.y centroids (y grows downwards)."""
    return {"left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y}[relation]


def prompt_passes(detections: list[Detection], spec: PromptSpec) -> bool:
    for want in spec.wants:
        n = sum(_matches(d, want) for d in detections)
        if (want.count is None and n < 1) or (want.count is not None and n != want.count):
            return False
    if spec.relation is not None:
        a_dets = [d for d in detections if _matches(d, spec.wants[0])]
        b_dets = [d for d in detections if _matches(d, spec.wants[1])]
        return any(_holds(a, b, spec.relation) for a in a_dets for b in b_dets)
    return True


def t2i_passes(image: np.ndarray, spec: PromptSpec) -> bool:
    """Whether one uint8 image (H, W, 3) shows its prompt."""
    return bool(prompt_passes(detect_objects(np.asarray(image)), spec))


def t2i_scores(passes: list[bool], prompts: list[PromptSpec]) -> dict:
    """Per-prompt verdicts -> {category: pass rate, 'overall': mean of categories}."""
    per_cat: dict[str, list[bool]] = {}
    for ok, spec in zip(passes, prompts, strict=True):
        per_cat.setdefault(spec.category, []).append(bool(ok))
    scores = {c: float(np.mean(v)) for c, v in per_cat.items()}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores


def evaluate_t2i(images: np.ndarray, prompts: list[PromptSpec]) -> dict:
    """images uint8 (B, H, W, 3), one per prompt -> {category: score, 'overall': mean of categories}."""
    if len(images) != len(prompts):
        raise ValueError(f"evaluate_t2i: {len(images)} images for {len(prompts)} prompts")
    if np.asarray(images).dtype != np.uint8:
        raise ValueError(f"evaluate_t2i: images must be uint8 in [0, 255], got {np.asarray(images).dtype}")
    return t2i_scores([t2i_passes(image, spec) for image, spec in zip(images, prompts)], prompts)


# ------------------------------------------------------------------ captions
_QUANTITY = {"a": 1, "an": 1, "one": 1, **{w: i for i, w in enumerate(shapes.NUMBER_WORDS)},
             **{str(i): i for i in range(10)}}
_REL_RE = re.compile(r"\b(left of|right of|above|below)\b")


def _parse_phrase(phrase: str) -> tuple[int, str | None, str] | None:
    words = phrase.split()
    if len(words) < 2 or words[0] not in _QUANTITY:
        return None
    count, rest = _QUANTITY[words[0]], words[1:]
    color = rest[0] if rest[0] in shapes.COLORS else None
    rest = rest[1:] if color else rest
    if len(rest) != 1:
        return None
    noun = rest[0][:-1] if rest[0].endswith("s") and rest[0][:-1] in shapes.SHAPES else rest[0]
    return (count, color, noun) if noun in shapes.SHAPES else None


def parse_caption(text: str) -> tuple[Counter, tuple | None]:
    """-> (Counter {(color|None, shape): count}, relation (kind_a, rel, kind_b) or None).
    Phrases that do not parse are dropped (they then count as missing objects)."""
    text = re.sub(r"[^a-z0-9, ]", " ", text.lower())
    rel_match = _REL_RE.search(text)
    if rel_match:
        a = _parse_phrase(text[: rel_match.start()].replace(",", " "))
        b = _parse_phrase(text[rel_match.end():].replace(",", " "))
        counts = Counter({(p[1], p[2]): p[0] for p in (a, b) if p is not None})
        rel = rel_match.group(1).split()[0]
        relation = ((a[1], a[2]), rel, (b[1], b[2])) if a and b and a[0] == 1 and b[0] == 1 else None
        return counts, relation
    counts: Counter = Counter()
    for phrase in re.split(r",|\band\b", text):
        parsed = _parse_phrase(phrase)
        if parsed is not None:
            counts[(parsed[1], parsed[2])] += parsed[0]
    return counts, None


def _overlap(p: Counter, t: Counter) -> float:
    denom = max(sum(p.values()), sum(t.values()))
    return sum((p & t).values()) / denom if denom else 1.0


def _relation_true(scene: shapes.Scene, relation) -> bool:
    (ca, sa), rel, (cb, sb) = relation
    pick = lambda c, s: [o for o in scene.objects if o.shape == s and (c is None or o.color == c)]  # noqa: E731
    return any(_holds(a, b, rel) for a in pick(ca, sa) for b in pick(cb, sb))


def evaluate_captions(pred_captions: list[str], scenes: list[shapes.Scene]) -> dict:
    """exact_match: the caption names exactly the scene's objects (color, shape, count) and
    any relation it states holds. attribute_accuracy: mean of the per-attribute scores
    (object count, colors, shapes, color-shape pairs as multiset overlaps).
    relation_accuracy: over the captions that state a relation (None if none do)."""
    if len(pred_captions) != len(scenes):
        raise ValueError(f"evaluate_captions: {len(pred_captions)} captions for {len(scenes)} scenes")
    rows = {"count": [], "color": [], "shape": [], "pair": [], "relation": [], "exact": []}
    for text, scene in zip(pred_captions, scenes):
        counts, relation = parse_caption(text)
        truth = scene.counts()
        colors, shapes_ = Counter(), Counter()
        for (c, s), n in counts.items():
            shapes_[s] += n
            if c is not None:
                colors[c] += n
        rows["count"].append(float(sum(counts.values()) == len(scene.objects)))
        rows["color"].append(_overlap(colors, Counter(o.color for o in scene.objects)))
        rows["shape"].append(_overlap(shapes_, Counter(o.shape for o in scene.objects)))
        rows["pair"].append(_overlap(counts, truth))
        rel_ok = relation is None or _relation_true(scene, relation)
        if relation is not None:
            rows["relation"].append(float(rel_ok))
        rows["exact"].append(float(counts == truth and rel_ok))
    out = {f"{k}_accuracy": float(np.mean(v)) if v else None for k, v in rows.items() if k != "exact"}
    out["attribute_accuracy"] = float(np.mean([out[f"{k}_accuracy"] for k in ("count", "color", "shape", "pair")]))
    out["exact_match"] = float(np.mean(rows["exact"]))
    return out


# ----------------------------------------------------------------------- VQA
_NUMBERS = {w: str(i) for i, w in enumerate(shapes.NUMBER_WORDS)}


def normalize_answer(answer: str) -> str:
    """Lower case, no punctuation or articles, number words as digits (VQAv2-like)."""
    words = re.sub(r"[^a-z0-9 ]", " ", answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in ("a", "an", "the"))


def evaluate_vqa(pred_answers: list[str], true_answers: list[str]) -> dict:
    if len(pred_answers) != len(true_answers):
        raise ValueError(f"evaluate_vqa: {len(pred_answers)} answers for {len(true_answers)} questions")
    hits = [normalize_answer(p) == normalize_answer(t) for p, t in zip(pred_answers, true_answers)]
    return {"accuracy": float(np.mean(hits)) if hits else 0.0}


# ------------------------------------------------------------------ eval sets
@dataclasses.dataclass(frozen=True)
class CaptionEvalSet:
    images: np.ndarray  # uint8 (n, H, W, 3)
    scenes: list
    captions: list


@dataclasses.dataclass(frozen=True)
class VqaEvalSet:
    images: np.ndarray  # uint8 (n, H, W, 3)
    questions: list
    answers: list
    scenes: list


def caption_eval_set(seed: int, n: int, image_size: int, world: shapes.World = shapes.FULL_WORLD
                     ) -> CaptionEvalSet:
    scenes = [shapes.scene_record(seed, i, world) for i in range(n)]
    caps = [shapes.caption(s, np.random.default_rng([seed, i, 2])) for i, s in enumerate(scenes)]
    return CaptionEvalSet(np.stack([shapes.render(s, image_size) for s in scenes]), scenes, caps)


def vqa_eval_set(seed: int, n: int, image_size: int, world: shapes.World = shapes.FULL_WORLD) -> VqaEvalSet:
    scenes = [shapes.scene_record(seed, i, world) for i in range(n)]
    qa = []
    for i, s in enumerate(scenes):
        pairs = shapes.questions(s, world)
        qa.append(pairs[int(np.random.default_rng([seed, i, 3]).integers(len(pairs)))])
    return VqaEvalSet(np.stack([shapes.render(s, image_size) for s in scenes]),
                      [q for q, _ in qa], [a for _, a in qa], scenes)
