"""Evaluation entry point.

    python -m dual_diffusion.evaluate --suite=shapes --oracle

scores ground-truth renders of the shapes world with the exact evaluator
(dual_diffusion/data/shapes_eval.py) and prints the scores as JSON: every
GenEval category, captions and VQA should be 1.0 (>= 0.99) at any image size
from 32 px. It is the evaluator's self-check; scoring a model comes later.
"""
import json

from absl import app, flags

_SUITE = flags.DEFINE_enum("suite", "shapes", ["shapes"], "Evaluation suite.")
_ORACLE = flags.DEFINE_bool("oracle", False, "Score ground-truth renders instead of a model's output.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Render size in pixels.")
_PER_CATEGORY = flags.DEFINE_integer("per_category", 50, "Text-to-image prompts per GenEval category.")
_NUM_CAPTIONS = flags.DEFINE_integer("num_captions", 200, "Images to caption.")
_NUM_VQA = flags.DEFINE_integer("num_vqa", 200, "VQA questions.")
_SEED = flags.DEFINE_integer("seed", 1234, "Seed of the evaluation sets (keep it apart from training seeds).")


def shapes_oracle_scores(seed: int, image_size: int, per_category: int, num_captions: int,
                         num_vqa: int) -> dict:
    """Scores of the truth: t2i (renders of each prompt's scene), captions, VQA answers."""
    import numpy as np

    from dual_diffusion.data import shapes, shapes_eval

    prompts = shapes_eval.t2i_prompt_set(seed, per_category)
    images = np.stack([shapes.render(p.scene, image_size) for p in prompts])
    caps = shapes_eval.caption_eval_set(seed, num_captions, image_size)
    vqa = shapes_eval.vqa_eval_set(seed, num_vqa, image_size)
    # The image reader is checked too: captions against the scenes read from the
    # pixels, and VQA answered from those scenes.
    read_scenes = [shapes_eval.scene_from_image(im) for im in caps.images]
    read_answers = [shapes_eval.answer_from_image(im, q) for im, q in zip(vqa.images, vqa.questions)]
    return {
        "suite": "shapes", "oracle": True, "image_size": image_size,
        "t2i": shapes_eval.evaluate_t2i(images, prompts),
        "captions": shapes_eval.evaluate_captions(caps.captions, caps.scenes),
        "captions_vs_read_scenes": shapes_eval.evaluate_captions(caps.captions, read_scenes),
        "vqa": shapes_eval.evaluate_vqa(vqa.answers, vqa.answers),
        "vqa_answered_from_pixels": shapes_eval.evaluate_vqa(read_answers, vqa.answers),
    }


def main(argv):
    del argv
    if _SUITE.value != "shapes" or not _ORACLE.value:
        raise app.UsageError("only --suite=shapes --oracle is implemented so far (model scoring comes later)")
    print(json.dumps(shapes_oracle_scores(_SEED.value, _IMAGE_SIZE.value, _PER_CATEGORY.value,
                                          _NUM_CAPTIONS.value, _NUM_VQA.value), indent=2))


if __name__ == "__main__":
    app.run(main)
