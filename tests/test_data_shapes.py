"""Shapes world and its exact evaluator: oracle ~1, noise/flat/shuffled ~chance."""
import dataclasses

import numpy as np
import pytest

from dual_diffusion.data import shapes, shapes_eval, shapes_prompts


def test_records_are_deterministic_and_vary():
    a, b = shapes.scene_record(3, 17), shapes.scene_record(3, 17)
    assert a == b
    assert np.array_equal(shapes.render(a, 48), shapes.render(b, 48))
    assert len({shapes.scene_record(3, i) for i in range(20)}) == 20
    assert shapes.scene_record(3, 0) != shapes.scene_record(4, 0)


def test_scene_limits_and_placement():
    world = shapes.World(min_objects=2, max_objects=3)
    for i in range(200):
        scene = shapes.scene_record(0, i, world)
        assert 2 <= len(scene.objects) <= 3
        for j, o in enumerate(scene.objects):
            assert shapes._fits(o, list(scene.objects[:j]))
            assert o.r <= o.x <= 1 - o.r and o.r <= o.y <= 1 - o.r


SMALL = shapes.World(colors=("red", "blue"), shapes=("circle", "triangle"), min_objects=1, max_objects=1,
                     min_radius=0.18, max_radius=0.24)


def test_a_small_world_draws_only_its_own_scenes_and_questions():
    scenes = [shapes.scene_record(2, i, SMALL) for i in range(300)]
    kinds = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert kinds == {(c, s) for c in SMALL.colors for s in SMALL.shapes}  # every kind occurs, no other
    assert {len(s.objects) for s in scenes} == {1} and all(0.18 <= s.objects[0].r <= 0.24 for s in scenes)
    for scene in scenes[:50]:
        qa = shapes.questions(scene, SMALL)
        assert not any("square" in q or "how many" in q for q, _ in qa), qa  # no counts, no squares here
        assert sum(a == "yes" for _, a in qa) == sum(a == "no" for _, a in qa) == 1
        assert all(word in ("red", "blue", "circle", "triangle", "zero", "one", "yes", "no")
                   for _, a in qa for word in a.split())
    words = set(" ".join(shapes.shapes_captions_corpus(0, 100, SMALL)).split())
    assert {"red", "blue", "triangle"} <= words and not words & {"green", "square", "squares", "left"}


def test_spread_draws_single_objects_around_the_centre():
    for spread in (0.0, 0.5):
        world = dataclasses.replace(SMALL, spread=spread)
        offsets = [max(abs(o.x - 0.5), abs(o.y - 0.5)) for i in range(200)
                   for o in shapes.scene_record(1, i, world).objects]
        assert max(offsets) <= spread * (0.5 - 0.18 - 0.02) + 1e-4 and (spread == 0 or max(offsets) > 0.05)


def test_world_categories_and_errors():
    assert shapes_eval.categories() == shapes_eval.CATEGORIES  # the full world has all six
    assert shapes_eval.categories(SMALL) == ("single_object", "colors")
    assert shapes_eval.categories(shapes.World(min_objects=2, max_objects=3)) == (
        "two_object", "counting", "position", "color_attr")
    prompts = shapes_eval.t2i_prompt_set(3, 20, SMALL)
    assert {p.prompt for p in prompts} <= {"a circle", "a triangle"} | {f"a {c} {s}" for c in SMALL.colors
                                                                         for s in SMALL.shapes}
    with pytest.raises(ValueError, match="does not apply"):
        shapes_prompts.make_prompt("counting", np.random.default_rng(0), SMALL)
    assert shapes.World.from_config(None) == shapes.FULL_WORLD
    assert shapes.World.from_config({"colors": ["red", "blue"], "max_objects": 2}).colors == ("red", "blue")
    for bad, message in [(dict(colors=("red", "mauve")), "colors="), (dict(shapes=()), "shapes="),
                         (dict(min_objects=2, max_objects=1), "min_objects=2"),
                         (dict(max_radius=0.3), "max_radius=0.3"),
                         (dict(min_radius=0.24, max_radius=0.24), "do not fit"), (dict(size=3), "unknown keys"),
                         (dict(spread=0.5), "below 1 only with max_objects=1"), (dict(spread=-1), "spread=-1")]:
        with pytest.raises(ValueError, match=message):
            shapes.World.from_config(bad)


@pytest.mark.parametrize("size", [24, 32])
def test_reader_is_exact_on_a_small_world_of_large_objects(size):
    """The demo's kind of world (one object of radius 0.18-0.24): every render reads back, every oracle
    prompt passes, the oracle VQA answers come back from the pixels."""
    for i in range(100):
        scene = shapes.scene_record(5, i, SMALL)
        assert shapes_eval.scene_from_image(shapes.render(scene, size)).counts() == scene.counts(), (size, i)
    prompts = shapes_eval.t2i_prompt_set(5, 30, SMALL)
    scores = shapes_eval.evaluate_t2i(np.stack([shapes.render(p.scene, size) for p in prompts]), prompts)
    assert scores == {"single_object": 1.0, "colors": 1.0, "overall": 1.0}
    ev = shapes_eval.vqa_eval_set(4, 60, size, SMALL)
    read = [shapes_eval.answer_from_image(im, q, SMALL) for im, q in zip(ev.images, ev.questions)]
    assert shapes_eval.evaluate_vqa(read, ev.answers)["accuracy"] == 1.0


@pytest.mark.parametrize("size", [32, 64, 160])
def test_image_reader_recovers_every_scene(size):
    for i in range(60):
        scene = shapes.scene_record(11, i)
        read = shapes_eval.scene_from_image(shapes.render(scene, size))
        assert read.counts() == scene.counts(), (size, i, scene, read)


@pytest.mark.parametrize("size", [32, 64])
def test_t2i_oracle_passes_and_noise_fails(size):
    prompts = shapes_eval.t2i_prompt_set(seed=5, per_category=20)
    assert {p.category for p in prompts} == set(shapes_eval.CATEGORIES)
    truth = np.stack([shapes.render(p.scene, size) for p in prompts])
    scores = shapes_eval.evaluate_t2i(truth, prompts)
    assert all(v >= 0.99 for v in scores.values()), scores
    noise = np.random.default_rng(0).integers(0, 256, truth.shape, dtype=np.uint8)
    assert shapes_eval.evaluate_t2i(noise, prompts)["overall"] <= 0.05
    flat = np.empty_like(truth)
    flat[...] = shapes.COLORS["red"]
    assert shapes_eval.evaluate_t2i(flat, prompts)["overall"] <= 0.05


def test_t2i_criteria_on_edited_scenes():
    prompts = shapes_eval.t2i_prompt_set(seed=2, per_category=10)
    # Swapping the two objects' places breaks position prompts only.
    for p in prompts:
        if p.category != "position":
            continue
        a, b = p.scene.objects
        swapped = shapes.Scene((shapes.Obj(a.shape, a.color, b.x, b.y, a.r),
                                shapes.Obj(b.shape, b.color, a.x, a.y, b.r)))
        assert not shapes_eval.prompt_passes(shapes_eval.detect_objects(shapes.render(swapped, 64)), p)
    # One object more breaks counting.
    for p in prompts:
        if p.category == "counting":
            extra = shapes.place_objects(np.random.default_rng(0), [("red", p.wants[0].shape)] * (p.wants[0].count + 1))
            assert not shapes_eval.prompt_passes(shapes_eval.detect_objects(shapes.render(extra, 64)), p)


def test_captions_truth_one_shuffled_near_chance():
    ev = shapes_eval.caption_eval_set(seed=9, n=150, image_size=32)
    assert shapes_eval.evaluate_captions(ev.captions, ev.scenes) == pytest.approx(
        {k: 1.0 for k in shapes_eval.evaluate_captions(ev.captions, ev.scenes)})
    perm = np.random.default_rng(0).permutation(len(ev.captions))
    shuffled = shapes_eval.evaluate_captions([ev.captions[j] for j in perm], ev.scenes)
    assert shuffled["exact_match"] <= 0.05 and shuffled["attribute_accuracy"] <= 0.35, shuffled
    read = [shapes_eval.scene_from_image(im) for im in ev.images]
    assert shapes_eval.evaluate_captions(ev.captions, read)["exact_match"] == 1.0


def test_caption_parser():
    counts, rel = shapes_eval.parse_caption("Two red circles, a blue square and an orange triangle.")
    assert counts == {("red", "circle"): 2, ("blue", "square"): 1, ("orange", "triangle"): 1} and rel is None
    counts, rel = shapes_eval.parse_caption("a green triangle right of a yellow circle")
    assert rel == (("green", "triangle"), "right", ("yellow", "circle"))
    assert shapes_eval.parse_caption("a dog on a sofa")[0] == {}


def test_vqa_truth_one_shuffled_low_and_normalisation():
    ev = shapes_eval.vqa_eval_set(seed=4, n=150, image_size=32)
    assert shapes_eval.evaluate_vqa(ev.answers, ev.answers)["accuracy"] == 1.0
    perm = np.random.default_rng(1).permutation(len(ev.answers))
    assert shapes_eval.evaluate_vqa([ev.answers[j] for j in perm], ev.answers)["accuracy"] <= 0.35
    read = [shapes_eval.answer_from_image(im, q) for im, q in zip(ev.images, ev.questions)]
    assert shapes_eval.evaluate_vqa(read, ev.answers)["accuracy"] == 1.0
    assert shapes_eval.normalize_answer(" The Red circle. ") == "red circle"
    assert shapes_eval.normalize_answer("Two") == shapes_eval.normalize_answer("2") == "2"


def test_questions_are_answered_by_the_scene():
    scene = shapes.Scene((shapes.Obj("circle", "red", 0.2, 0.5, 0.15), shapes.Obj("square", "blue", 0.8, 0.5, 0.15)))
    qa = dict(shapes.questions(scene))
    assert qa["what color is the circle?"] == "red"
    assert qa["what shape is the blue object?"] == "square"
    assert qa["how many triangles are there?"] == "zero"
    assert qa["is there a red circle?"] == "yes"
    assert qa["which is further left, the red circle or the blue square?"] == "red circle"
    assert qa["is the blue square left of the red circle?"] == "no"
    assert sum(a == "no" for a in qa.values() if a in ("yes", "no")) == 3  # 2 absent kinds + relation
    assert shapes.list_caption(scene) == "a red circle and a blue square"
    assert shapes.relation_caption(scene, shapes.relation_of(scene), flip=True) == "a blue square right of a red circle"


def test_corpus_covers_the_world():
    corpus = shapes.shapes_captions_corpus(0, 30)
    text = " ".join(corpus)
    for word in list(shapes.COLORS) + list(shapes.SHAPES) + ["Answer the question", "left of", "how many"]:
        assert word in text


def test_evaluate_cli_oracle_prints_json():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "dual_diffusion.evaluate", "--suite=shapes", "--oracle",
                          "--image_size=32", "--per_category=8", "--num_captions=30", "--num_vqa=30"],
                         capture_output=True, text=True, check=True, timeout=120)
    scores = json.loads(out.stdout)
    flat = [v for k in ("t2i", "captions", "captions_vs_read_scenes", "vqa", "vqa_answered_from_pixels")
            for v in scores[k].values() if v is not None]
    assert len(flat) > 10 and min(flat) >= 0.99, scores
