r"""Evaluation from the command line; prints one JSON object of scores.

  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=shapes [--per_category=50 --num_captions=200
      --num_vqa=200 --t2i_steps=28 --cfg=7 --grid=diffusers|linspace --text_steps=N
      --sampler=ancestral|confidence|semi_ar|threshold --threshold=0.9 --image_cache=R --text_cache
      --decoding=first_eos|release]
  python -m dual_diffusion.evaluate --checkpoint=WORKDIR --suite=shapes --preset=demo   # the demo's final scores
  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=coco_captions --annotations=captions_val2014.json
      --images=val2014/ [--max_images=5000] [--release-decoding]  # CIDEr; needs pycocoevalcap
  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=vqav2 --questions=Q.json --annotations=A.json
      --images=val2014/ [--max_questions=N] [--release-decoding]   # VQAv2 accuracy
  python -m dual_diffusion.evaluate --checkpoint=DIR --suite=geneval --prompts=evaluation_metadata.jsonl
      --out_dir=DIR [--samples_per_prompt=4]                       # images for GenEval's own scorer
  python -m dual_diffusion.evaluate --suite=shapes --oracle [--checkpoint=WORKDIR]  # the evaluator's self-check

DIR is a converted checkpoint or a training workdir (its latest EMA weights).
The shapes suite draws from the shapes world a workdir trained on (its
config.json's data.shapes_world), else the full world.
Defaults: 28 Euler steps on diffusers' scheduler levels, CFG 7; captions and VQA
in 128-token rows (a workdir's trained length when shorter), 64 and 32 ancestral
steps, text cut at the first EOS. `--preset=demo` takes every setting of the
trainer's end-of-training evaluation from WORKDIR/config.json (configs/demo.py for
a checkpoint that is not a workdir); `--release-decoding` runs the release's
text protocol (ancestral, 64 / 32 steps, 128 tokens, a VAE posterior draw as the
image, its decoding). Explicit flags override both. The scores give the mean network
calls per caption / answer (`nfe`) beside the settings.
Scores also go to OUT/scores.json and OUT/scores.md, OUT = --out_dir, default
the checkpoint's eval/ folder when writable, else the current folder (geneval
writes only its image folders, which GenEval's scorer walks). The oracle
scores ground-truth renders: every number should be 1.0 (>= 0.99) from 32 px.
Bad arguments print `error: ...` and exit 2, without a traceback.

At scale: the model runs on a mesh of every device of every process (--mesh_data /
--mesh_fsdp / --mesh_tensor, defaults as in `sample`); on several hosts every process
runs the same command and only process 0 writes and prints. Items stream in global
batches of --batch_size with a progress bar (items/s, ETA); scores.json records each
part's items/s. OUT/partial_<suite>.jsonl holds every finished batch's results: a killed
run, restarted with the same settings (batch size and mesh may change), skips what it
holds; when the run completes it becomes OUT/items_<suite>.jsonl (one result per item).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dual_diffusion.cli import UsageError, run_command
from dual_diffusion.diffusion.image_sampling import GRIDS
from dual_diffusion.diffusion.text_sampling import METHODS
from dual_diffusion.inference.pipelines import DECODINGS, IMAGE_LATENTS, PROMPT_PADDINGS

SUITES = ("shapes", "coco_captions", "vqav2", "geneval")
PRESETS = ("demo",)
DEFAULTS = dict(batch_size=16, seed=1234, dtype="float32", per_category=50, num_captions=200, num_vqa=200)
# flag -> field of ImageOptions / of both TextOptions
IMAGE_FLAGS = {"t2i_steps": "steps", "cfg": "cfg_scale", "shift": "shift", "grid": "grid"}
TEXT_FLAGS = {"text_steps": "steps", "sampler": "method", "temperature": "temperature",
              "min_new_tokens": "min_new_tokens", "decoding": "decoding", "image_latents": "image_latents",
              "threshold": "threshold", "factor": "factor", "num_blocks": "num_blocks", "image_cache": "image_cache",
              "text_cache": "text_cache"}
# What --release-decoding fixes for both text tasks (the steps are per task: pipelines.TEXT_STEPS).
RELEASE_TEXT = {"sampler": "ancestral", "temperature": 1.0, "min_new_tokens": 0, "decoding": "release",
                "image_latents": "sample"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dual_diffusion.evaluate", description=__doc__.split("\n")[0])
    add = lambda name, **kw: p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []),
                                            **kw)  # noqa: E731
    add("checkpoint", help="converted checkpoint or training workdir")
    add("suite", default="shapes", choices=SUITES)
    add("oracle", action="store_true",
        help="shapes only: score ground-truth renders, no model (of --checkpoint's world if given)")
    add("preset", choices=PRESETS, help="demo: the trainer's end-of-training evaluation settings")
    add("release_decoding", action="store_true",
        help="the release's text protocol: ancestral, 64 caption / 32 VQA steps, 128 tokens, its decoding")
    add("out_dir", help="where scores.json / scores.md (or GenEval's folders) go")
    add("image_size", type=int, help="default: the checkpoint's (oracle: 64)")
    add("text_length", type=int, help="tokens per text row, every task (default: see above)")
    # Settings a preset may set: None here means "not given", resolved in `resolve_settings`.
    add("batch_size", type=int, help=f"default {DEFAULTS['batch_size']}")
    add("seed", type=int, help=f"seed of the evaluation sets and samplers (default {DEFAULTS['seed']})")
    add("dtype", choices=("float32", "bfloat16"), help="compute dtype (default float32)")
    add("param_dtype", choices=("float32", "bfloat16"), default="float32",
        help="dtype the weights are held in (bfloat16: half the memory per device)")
    add("t2i_steps", type=int, help="default 28")
    add("cfg", type=float, help="image classifier-free guidance scale (default 7)")
    add("shift", type=float, help="SD3 time shift of the image sampler (default 3)")
    add("grid", choices=GRIDS, help="image noise levels (default diffusers: the release's scheduler)")
    add("text_steps", type=int, help="caption and VQA steps (default 64 and 32)")
    add("sampler", choices=METHODS, help="default ancestral")
    # Fast text decoding (README, Sampling): the threshold sampler and the image K/V cache.
    add("threshold", type=float, help="threshold sampler: reveal tokens with probability >= this (default 0.9)")
    add("factor", type=float, help="threshold sampler: the factor rule with this f instead of the threshold")
    add("num_blocks", type=int, help="blocks of semi_ar and threshold (default 4)")
    add("image_cache", type=int, nargs="?", const=0, metavar="R", help="reuse the image's keys/values, "
        "refreshed every R network calls (0, the value when R is left out: never) and at block starts (default off)")
    add("text_cache", action="store_true", default=None, help="semi_ar / threshold: also reuse the text's "
        "keys/values in T5 and the MM-DiT, running them on a window over each row's active block between full "
        "passes (implies --image_cache, whose R it uses)")
    add("prompt_padding", choices=PROMPT_PADDINGS, help="pad id of prompt rows (default: declared for a "
        "converted checkpoint, eos for a training workdir)")
    add("temperature", type=float, help="default 1")
    add("min_new_tokens", type=int, help="EOS banned on the first N generated tokens (default 0)")
    add("decoding", choices=DECODINGS, help="default first_eos")
    add("image_latents", choices=IMAGE_LATENTS, help="caption/VQA image condition (default mean)")
    add("caption_length", type=int, help="generated caption tokens at most (default: the whole row)")
    add("per_category", type=int, help=f"shapes: prompts per GenEval category (default {DEFAULTS['per_category']})")
    add("num_captions", type=int, help=f"shapes: images to caption (default {DEFAULTS['num_captions']})")
    add("num_vqa", type=int, help=f"shapes: VQA questions (default {DEFAULTS['num_vqa']})")
    add("annotations", help="coco_captions / vqav2 annotation JSON")
    add("questions", help="vqav2 questions JSON")
    add("images", help="coco_captions / vqav2 image folder")
    add("max_images", type=int, help="coco_captions: first N images by id")
    add("max_questions", type=int, help="vqav2: first N questions by id")
    add("prompts", help="geneval: evaluation_metadata.jsonl")
    add("samples_per_prompt", type=int, default=4, help="geneval: images per prompt")
    for axis in ("data", "fsdp", "tensor"):  # where it runs: inference/sharded.py
        add(f"mesh_{axis}", type=int, help="mesh size (default: every device on data, weights replicated when "
                                           "they fit, else sharded over the fewest fsdp devices that hold them)")
    return p.parse_args(argv)


def _check(args) -> None:
    if args.oracle:
        if args.suite != "shapes":
            raise UsageError(f"--oracle exists for --suite=shapes only, not --suite={args.suite}")
    elif not args.checkpoint:
        raise UsageError("--checkpoint is required (or --suite=shapes --oracle)")
    if args.checkpoint and not _ckpt_path(args.checkpoint).is_dir():  # pathlib: gs://b/x would be gs:/b/x
        raise UsageError(f"--checkpoint={args.checkpoint}: no such folder")
    for name in ("batch_size", "t2i_steps", "text_steps", "samples_per_prompt", "image_size", "text_length",
                 "caption_length", "max_images", "max_questions", "num_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name}={value}: expected >= 1")
    for name in ("per_category", "num_captions", "num_vqa", "min_new_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
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
    if args.oracle and (args.preset or args.release_decoding):
        raise UsageError("--oracle samples nothing: drop --preset / --release-decoding")
    if args.preset and args.release_decoding:
        raise UsageError(f"--preset={args.preset} and --release-decoding are two different protocols: pick one")


def _ckpt_path(checkpoint: str):
    """--checkpoint as an etils.epath.Path (gs:// kept as it is; imported here: Orbax loads slowly)."""
    from dual_diffusion.checkpoints.paths import workdir_path

    return workdir_path(checkpoint)


def preset_config(name: str, checkpoint: str) -> dict:
    """The training config a preset reads: CHECKPOINT/config.json (the run's own), else configs/<name>.py."""
    saved = _ckpt_path(checkpoint) / "config.json"
    if saved.is_file():
        try:
            return json.loads(saved.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"--preset={name}: cannot read {saved}: {e}") from None
    repo = Path(__file__).resolve().parents[1]
    if not (repo / "configs" / f"{name}.py").is_file():
        raise UsageError(f"--preset={name}: {checkpoint} has no config.json and configs/{name}.py is not "
                         "next to this package")
    import importlib

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    return importlib.import_module(f"configs.{name}").get_config().to_dict()


def shapes_world(checkpoint: str | None):
    """The shapes world a workdir trained on (data.shapes_world of its config.json); the full world for
    no checkpoint, a converted one, or a run from before worlds were configurable."""
    from dual_diffusion.data import shapes

    saved = _ckpt_path(checkpoint) / "config.json" if checkpoint else None
    if saved is None or not saved.is_file():
        return shapes.FULL_WORLD
    try:
        return shapes.world_of_run(json.loads(saved.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"cannot read the shapes world (data.shapes_world) of {saved}: {e}") from None


def resolve_settings(args) -> dict:
    """Everything a suite samples with: explicit flags, else the preset / release protocol, else DEFAULTS.

    Returns {"image_opts", "caption_opts", "vqa_opts", "batch_size", "seed", "dtype", "per_category",
    "num_captions", "num_vqa", "text_length", "image_size", "caption_length"}.
    """
    import dataclasses

    from dual_diffusion.inference.pipelines import TEXT_STEPS, ImageOptions, TextOptions

    out = dict(DEFAULTS, image_opts=ImageOptions(), caption_opts=TextOptions(steps=TEXT_STEPS["caption"]),
               vqa_opts=TextOptions(steps=TEXT_STEPS["vqa"]), text_length=None, image_size=None)
    if args.preset:
        from dual_diffusion.evaluation.suites import training_suite_settings

        config = preset_config(args.preset, args.checkpoint)
        try:
            suite = training_suite_settings(config)
            sizes = dict(dtype=config["runtime"]["dtype"], text_length=int(config["data"]["text_length"]),
                         image_size=int(config["data"]["image_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"--preset={args.preset}: the config of {args.checkpoint} lacks or mangles "
                             f"{e}; expected a training config (samples, eval, loss, data, runtime)") from None
        out.update({k: suite[k] for k in ("batch_size", "seed", "per_category", "num_captions", "num_vqa")},
                   image_opts=suite["image_opts"], caption_opts=suite["text_opts"], vqa_opts=suite["text_opts"],
                   **sizes)
    if args.release_decoding:
        fields = {TEXT_FLAGS[k]: v for k, v in RELEASE_TEXT.items()}
        out.update(caption_opts=TextOptions(steps=TEXT_STEPS["caption"], **fields),
                   vqa_opts=TextOptions(steps=TEXT_STEPS["vqa"], **fields), image_opts=ImageOptions())
    try:
        image = {field: getattr(args, flag) for flag, field in IMAGE_FLAGS.items() if getattr(args, flag) is not None}
        text = {field: getattr(args, flag) for flag, field in TEXT_FLAGS.items() if getattr(args, flag) is not None}
        out.update(image_opts=dataclasses.replace(out["image_opts"], **image),
                   caption_opts=dataclasses.replace(out["caption_opts"], **text),
                   vqa_opts=dataclasses.replace(out["vqa_opts"], **text))
    except ValueError as e:
        raise UsageError(str(e)) from None
    out.update({k: getattr(args, k) for k in (*DEFAULTS, "text_length", "image_size") if getattr(args, k) is not None})
    out["caption_length"] = args.caption_length
    return out


def shapes_oracle_scores(seed: int, image_size: int, per_category: int, num_captions: int,
                         num_vqa: int, world=None) -> dict:
    """Scores of the truth in `world` (default the full one): t2i (renders of each prompt's scene),
    captions, VQA answers."""
    import numpy as np

    from dual_diffusion.data import shapes, shapes_eval

    world = world or shapes.FULL_WORLD
    prompts = shapes_eval.t2i_prompt_set(seed, per_category, world)
    images = np.stack([shapes.render(p.scene, image_size) for p in prompts])
    caps = shapes_eval.caption_eval_set(seed, num_captions, image_size, world)
    vqa = shapes_eval.vqa_eval_set(seed, num_vqa, image_size, world)
    # The image reader is checked too: captions against the scenes read from the
    # pixels, and VQA answered from those scenes.
    read_scenes = [shapes_eval.scene_from_image(im) for im in caps.images]
    read_answers = [shapes_eval.answer_from_image(im, q, world) for im, q in zip(vqa.images, vqa.questions)]
    return {
        "suite": "shapes", "oracle": True, "image_size": image_size, "world": world.to_config(),
        "t2i": shapes_eval.evaluate_t2i(images, prompts),
        "captions": shapes_eval.evaluate_captions(caps.captions, caps.scenes),
        "captions_vs_read_scenes": shapes_eval.evaluate_captions(caps.captions, read_scenes),
        "vqa": shapes_eval.evaluate_vqa(vqa.answers, vqa.answers),
        "vqa_answered_from_pixels": shapes_eval.evaluate_vqa(read_answers, vqa.answers),
    }


def default_out_dir(checkpoint: str | None) -> Path:
    """CHECKPOINT/eval when it can be created and written, else the current folder (an epath for gs://)."""
    if checkpoint:
        folder = _ckpt_path(checkpoint) / "eval"
        try:
            folder.mkdir(exist_ok=True)
            if "://" in os.fspath(folder) or os.access(folder, os.W_OK):  # an object store has no access bits
                return folder
        except OSError:
            pass
    return Path.cwd()


# Settings that change how the items are computed, not what they are: a partial run may resume under others.
EXECUTION_SETTINGS = ("batch_size", "mesh_data", "mesh_fsdp", "mesh_tensor", "out_dir")


def _model_scores(args) -> dict | None:
    from dual_diffusion import distributed
    from dual_diffusion.checkpoints.paths import is_local
    from dual_diffusion.evaluation import suites
    from dual_diffusion.evaluation.stream import PartialResults, ResumeError
    from dual_diffusion.inference import sharded
    from dual_diffusion.inference.pipelines import Pipeline
    from dual_diffusion.models.configs import Runtime

    if args.suite == "coco_captions":
        suites.metrics.require_pycocoevalcap()  # before the model loads and captions are generated
    prompts = suites.read_geneval_prompts(args.prompts) if args.suite == "geneval" else None
    st = resolve_settings(args)
    distributed.initialize_from_env()
    try:
        bundle, mesh, choice = sharded.load_on_mesh(args.checkpoint, Runtime(dtype=st["dtype"],
                                                                     param_dtype=args.param_dtype),
                                                    data=args.mesh_data, fsdp=args.mesh_fsdp, tensor=args.mesh_tensor)
    except sharded.MeshError as e:
        raise UsageError(str(e)) from None
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load --checkpoint={args.checkpoint}: {e}") from None
    pipe = Pipeline.from_bundle(bundle, image_size=st["image_size"], text_length=st["text_length"], mesh=mesh,
                                prompt_padding=args.prompt_padding)
    image_opts, caption_opts, vqa_opts = st["image_opts"], st["caption_opts"], st["vqa_opts"]
    if st["caption_length"] and st["caption_length"] > pipe.caption_text_length:
        raise UsageError(f"--caption_length={st['caption_length']} exceeds the caption rows' "
                         f"{pipe.caption_text_length} tokens")
    settings = {k: v for k, v in vars(args).items() if v is not None and v is not False}
    settings.update(_describe(st), image_size=pipe.image_size, text_length=pipe.text_length,
                    caption_text_length=pipe.caption_text_length, vqa_text_length=pipe.vqa_text_length)
    out = Path(args.out_dir) if args.out_dir else default_out_dir(args.checkpoint)
    journal = None
    if is_local(out):
        try:
            journal = PartialResults.open(out / f"partial_{args.suite}.jsonl", dict(
                {k: v for k, v in settings.items() if k not in EXECUTION_SETTINGS}, step=bundle.info.get("step")))
        except ResumeError as e:
            raise UsageError(str(e)) from None
    elif sharded.is_main():
        print(f"warning: results go to {out}, an object store: no partial results file, so an interrupted run "
              "starts over (give a local --out_dir to resume)", file=sys.stderr)
    common = dict(batch_size=st["batch_size"], seed=st["seed"], journal=journal)
    if args.suite == "shapes":
        scores = suites.shapes_suite(pipe, bundle.states, per_category=st["per_category"],
                                     num_captions=st["num_captions"], num_vqa=st["num_vqa"], image_opts=image_opts,
                                     text_opts=caption_opts, vqa_opts=vqa_opts, caption_length=st["caption_length"],
                                     world=shapes_world(args.checkpoint), **common)
    elif args.suite == "coco_captions":
        scores = suites.coco_captions_suite(pipe, bundle.states, annotations=args.annotations,
                                            images_dir=args.images, max_images=args.max_images,
                                            text_opts=caption_opts, caption_length=st["caption_length"], **common)
    elif args.suite == "vqav2":
        scores = suites.vqav2_suite(pipe, bundle.states, questions=args.questions, annotations=args.annotations,
                                    images_dir=args.images, max_questions=args.max_questions,
                                    text_opts=vqa_opts, **common)
    else:
        scores = suites.geneval_suite(pipe, bundle.states, prompts=prompts, out_dir=args.out_dir,
                                      samples_per_prompt=args.samples_per_prompt, image_opts=image_opts, **common)
    if journal is not None:
        journal.close(out / f"items_{args.suite}.jsonl")
    if not sharded.is_main():
        return None
    nfe = {task: pipe.mean_text_calls(task) for task in pipe.text_calls if pipe.text_calls[task]}
    return dict(scores, checkpoint=args.checkpoint, step=bundle.info.get("step"), text_length=pipe.text_length,
                mesh=sharded.describe_mesh(mesh, choice), settings=settings, out_dir=str(out),
                **({"nfe": nfe} if nfe else {}))


def _describe(st: dict) -> dict:
    """The resolved settings as JSON-friendly values (options as dicts, the schedule as its fields)."""
    import dataclasses

    return {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in st.items() if v is not None}


def run(args) -> dict:
    """The scores; also written to OUT/scores.{json,md} (module docstring)."""
    from dual_diffusion.evaluation import suites

    _check(args)
    if args.oracle:
        pick = lambda name: DEFAULTS[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
        scores = shapes_oracle_scores(pick("seed"), args.image_size or 64, pick("per_category"),
                                      pick("num_captions"), pick("num_vqa"), shapes_world(args.checkpoint))
    else:
        try:
            scores = _model_scores(args)
        except (suites.EvalDataError, suites.metrics.MissingPackageError) as e:
            raise UsageError(str(e)) from None
        if scores is None:  # not the reporting process of a multi-host run
            return None
    out = Path(scores.pop("out_dir", None) or args.out_dir or default_out_dir(args.checkpoint))
    if args.suite != "geneval" and (args.out_dir or not args.oracle):
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
