r"""Evaluation from the command line; prints one JSON object of scores.

  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=shapes [--per_category=50 --num_captions=200
      --num_vqa=200 --t2i_steps=28 --cfg=7 --text_steps=64 --sampler=ancestral|confidence|semi_ar]
  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=coco_captions --annotations=captions_val2014.json
      --images=val2014/ [--max_images=5000]                       # CIDEr; needs pycocoevalcap
  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=vqav2 --questions=Q.json --annotations=A.json
      --images=val2014/ [--max_questions=N]                        # VQAv2 accuracy
  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=geneval --prompts=evaluation_metadata.jsonl
      --out_dir=DIR [--samples_per_prompt=4]                       # images for GenEval's own scorer
  python -m dual_diffusion.evaluate --suite=shapes --oracle       # the shapes evaluator's self-check

DIR is a converted checkpoint or a training workdir (its latest EMA weights).
Scores also go to OUT/scores.json and OUT/scores.md, OUT = --out_dir, default
the checkpoint's eval/ folder when writable, else the current folder (geneval
writes only its image folders, which GenEval's scorer walks). The oracle
scores ground-truth renders: every number should be 1.0 (>= 0.99) from 32 px.
Bad arguments print `error: ...` and exit 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dual_diffusion.cli import UsageError, run_command

SUITES = ("shapes", "coco_captions", "vqav2", "geneval")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dual_diffusion.evaluate", description=__doc__.split("\n")[0])
    add = lambda name, **kw: p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []),
                                            **kw)  # noqa: E731
    add("checkpoint", help="converted checkpoint or training workdir")
    add("suite", default="shapes", choices=SUITES)
    add("oracle", action="store_true", help="shapes only: score ground-truth renders, no model")
    add("out_dir", help="where scores.json / scores.md (or GenEval's folders) go")
    add("image_size", type=int, help="default: the checkpoint's (oracle: 64)")
    add("text_length", type=int, help="default: the checkpoint's")
    add("batch_size", type=int, default=16)
    add("seed", type=int, default=1234, help="seed of the evaluation sets and samplers")
    add("dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    add("t2i_steps", type=int, default=28)
    add("cfg", type=float, default=7.0, help="image classifier-free guidance scale")
    add("shift", type=float, default=3.0, help="SD3 time shift of the image sampler")
    add("text_steps", type=int, default=64)
    add("sampler", default="ancestral", choices=("ancestral", "confidence", "semi_ar"))
    add("temperature", type=float, default=1.0)
    add("caption_length", type=int, help="generated caption tokens at most (default: the text length)")
    add("per_category", type=int, default=50, help="shapes: text-to-image prompts per GenEval category")
    add("num_captions", type=int, default=200, help="shapes: images to caption")
    add("num_vqa", type=int, default=200, help="shapes: VQA questions")
    add("annotations", help="coco_captions / vqav2 annotation JSON")
    add("questions", help="vqav2 questions JSON")
    add("images", help="coco_captions / vqav2 image folder")
    add("max_images", type=int, help="coco_captions: first N images by id")
    add("max_questions", type=int, help="vqav2: first N questions by id")
    add("prompts", help="geneval: evaluation_metadata.jsonl")
    add("samples_per_prompt", type=int, default=4, help="geneval: images per prompt")
    return p.parse_args(argv)


def _check(args) -> None:
    if args.oracle:
        if args.suite != "shapes":
            raise UsageError(f"--oracle exists for --suite=shapes only, not --suite={args.suite}")
    elif not args.checkpoint:
        raise UsageError("--checkpoint is required (or --suite=shapes --oracle)")
    elif not Path(args.checkpoint).is_dir():
        raise UsageError(f"--checkpoint={args.checkpoint}: no such folder")
    for name in ("batch_size", "t2i_steps", "text_steps", "samples_per_prompt", "image_size", "text_length",
                 "caption_length", "max_images", "max_questions"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name}={value}: expected >= 1")
    for name in ("per_category", "num_captions", "num_vqa"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name}={getattr(args, name)}: expected >= 0")
    needs = {"coco_captions": ("annotations", "images"), "vqav2": ("questions", "annotations", "images"),
             "geneval": ("prompts", "out_dir")}.get(args.suite, ())
    for name in needs:
        if not getattr(args, name):
            raise UsageError(f"--suite={args.suite} needs --{name}")
    for name in ("annotations", "questions", "prompts"):
        if name in needs and not Path(getattr(args, name)).is_file():
            raise UsageError(f"--{name}={getattr(args, name)}: no such file")
    if "images" in needs and not Path(args.images).is_dir():
        raise UsageError(f"--images={args.images}: no such folder")


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


def default_out_dir(checkpoint: str | None) -> Path:
    """CHECKPOINT/eval when it can be created and written, else the current folder."""
    if checkpoint:
        folder = Path(checkpoint) / "eval"
        try:
            folder.mkdir(exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            pass
    return Path.cwd()


def _model_scores(args) -> dict:
    from dual_diffusion import eval_suites as suites
    from dual_diffusion.models.configs import Runtime
    from dual_diffusion.pipelines import ImageOptions, Pipeline, TextOptions
    from dual_diffusion.pretrained import load_pretrained

    if args.suite == "coco_captions":
        suites.eval_metrics.require_pycocoevalcap()  # before the model loads and captions are generated
    prompts = suites.read_geneval_prompts(args.prompts) if args.suite == "geneval" else None
    try:
        bundle = load_pretrained(args.checkpoint, Runtime(dtype=args.dtype))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load --checkpoint={args.checkpoint}: {e}") from None
    pipe = Pipeline.from_bundle(bundle, image_size=args.image_size, text_length=args.text_length)
    image_opts = ImageOptions(steps=args.t2i_steps, cfg_scale=args.cfg, shift=args.shift)
    text_opts = TextOptions(steps=args.text_steps, method=args.sampler, temperature=args.temperature)
    if args.caption_length and args.caption_length > pipe.text_length:
        raise UsageError(f"--caption_length={args.caption_length} exceeds the text length {pipe.text_length}")
    common = dict(batch_size=args.batch_size, seed=args.seed)
    if args.suite == "shapes":
        scores = suites.shapes_suite(pipe, bundle.states, per_category=args.per_category,
                                     num_captions=args.num_captions, num_vqa=args.num_vqa, image_opts=image_opts,
                                     text_opts=text_opts, caption_length=args.caption_length, **common)
    elif args.suite == "coco_captions":
        scores = suites.coco_captions_suite(pipe, bundle.states, annotations=args.annotations,
                                            images_dir=args.images, max_images=args.max_images,
                                            text_opts=text_opts, caption_length=args.caption_length, **common)
    elif args.suite == "vqav2":
        scores = suites.vqav2_suite(pipe, bundle.states, questions=args.questions, annotations=args.annotations,
                                    images_dir=args.images, max_questions=args.max_questions,
                                    text_opts=text_opts, **common)
    else:
        scores = suites.geneval_suite(pipe, bundle.states, prompts=prompts, out_dir=args.out_dir,
                                      samples_per_prompt=args.samples_per_prompt, image_opts=image_opts, **common)
    settings = {k: v for k, v in vars(args).items() if v is not None}
    return dict(scores, checkpoint=args.checkpoint, step=bundle.info.get("step"),
                text_length=pipe.text_length, settings=settings)


def run(args) -> dict:
    """The scores; also written to OUT/scores.{json,md} (module docstring)."""
    from dual_diffusion import eval_suites as suites

    _check(args)
    if args.oracle:
        scores = shapes_oracle_scores(args.seed, args.image_size or 64, args.per_category, args.num_captions,
                                      args.num_vqa)
    else:
        try:
            scores = _model_scores(args)
        except (suites.EvalDataError, suites.eval_metrics.MissingPackageError) as e:
            raise UsageError(str(e)) from None
    if args.suite != "geneval" and (args.out_dir or not args.oracle):
        out = Path(args.out_dir) if args.out_dir else default_out_dir(args.checkpoint)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scores.json").write_text(json.dumps(scores, indent=2) + "\n")
        title = f"{scores['suite']}: {args.checkpoint or 'oracle'}"
        (out / "scores.md").write_text(suites.markdown_table(
            {k: v for k, v in scores.items() if k != "settings"}, title=title))
        scores["written_to"] = str(out)
    return scores


def main(argv=None) -> int:
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
