r"""Sampling from the command line: text to image, in-painting, captions and VQA.

  python -m dual_diffusion.sample --checkpoint=DIR --task=t2i --prompt="a red circle" [--prompts-file=F]
      [--num-images=4] [--steps=28] [--cfg=7] [--grid=diffusers|linspace] [--seed=0] --out=grid.png
  python -m dual_diffusion.sample --checkpoint=DIR --task=caption --image=a.png [--image=b.png]
      [--length=N] [--steps=64] [--sampler=ancestral|confidence|semi_ar|threshold] [--threshold=0.9]
      [--image-cache=R] [--decoding=first_eos|release] [--out=captions.json]
  python -m dual_diffusion.sample --checkpoint=DIR --task=vqa --image=a.png --question="what color is the circle?"
      [--steps=32]
  python -m dual_diffusion.sample --checkpoint=DIR --task=inpaint --image=a.png --mask=m.png --prompt="..." --out=x.png
  python -m dual_diffusion.sample --dry_run --topology=v5e-8 --task=caption|t2i|vqa [--checkpoint=DIR]
      [--batch-size=8] [--image-size=512] [--mesh_data=... --mesh_fsdp=...]   # compile for a TPU slice

DIR is a converted checkpoint (tools/convert_sd3_weights.py) or a training
workdir (its latest EMA weights). Images are resized (shorter side) and center
cropped to the model's size; a mask is white where the image is regenerated.
Defaults follow the release (README, Sampling): the image sampler runs on diffusers'
scheduler levels; caption and VQA rows are 128 tokens (a training workdir: the
length it trained at, when shorter), 64 steps for captions and 32 for VQA; prompts
are padded with the pad token a converted checkpoint's tokenizer declares (a workdir:
EOS, as it trained). The printed JSON has the settings used and, for captions and
VQA, the mean network calls per row (`nfe`). Bad arguments print `error: ...` and exit 2,
without a traceback.

Every call runs on a mesh of every device of every process (--mesh_data / --mesh_fsdp /
--mesh_tensor; by default all on data, the weights replicated when they fit a device,
else sharded over fsdp: inference/sharded.py); a batch is split over it. On several
hosts every process runs the same command (dual_diffusion.distributed finds the
cluster); only process 0 writes and prints. Item i's randomness is keyed by (--seed, i),
so the outputs do not depend on the devices or the batch size. `--dry_run --topology`
compiles the task for a TPU slice from this host instead (aot/inference_report.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dual_diffusion.cli import UsageError, run_command
from dual_diffusion.diffusion.image_sampling import GRIDS
from dual_diffusion.diffusion.text_sampling import METHODS
from dual_diffusion.inference.pipelines import DECODINGS, IMAGE_LATENTS, PROMPT_PADDINGS, TEXT_STEPS

TASKS = ("t2i", "caption", "vqa", "inpaint")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dual_diffusion.sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="converted checkpoint or training workdir (a dry run: optional)")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
    p.add_argument("--prompts-file", "--prompts_file", help="one prompt per line")
    p.add_argument("--num-images", "--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--negative-prompt", "--negative_prompt", default="", help="CFG's unconditional prompt")
    p.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    p.add_argument("--mask", action="append", default=[], help="in-painting mask per image (white = regenerate)")
    p.add_argument("--question", action="append", default=[], help="VQA question (one, or one per image)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 28 for images, 64 captions, 32 VQA)")
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale for images")
    p.add_argument("--shift", type=float, default=3.0, help="SD3 time shift of the image sampler")
    p.add_argument("--grid", default="diffusers", choices=GRIDS,
                   help="image noise levels: diffusers' FlowMatchEulerDiscreteScheduler (the release) or "
                        "shift(linspace(1, 0))")
    # Text decoding (captions, VQA): the sampler and its fast options.
    p.add_argument("--sampler", default="ancestral", choices=METHODS,
                   help="ancestral (the release), confidence, semi_ar, threshold (Fast-dLLM parallel decoding)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="threshold sampler: reveal every token with probability >= this (at least one per step)")
    p.add_argument("--factor", type=float, help="threshold sampler: the factor rule with this f instead")
    p.add_argument("--num-blocks", "--num_blocks", type=int, default=4, help="blocks of semi_ar and threshold")
    p.add_argument("--image-cache", "--image_cache", type=int, nargs="?", const=0, metavar="R",
                   help="reuse the image's keys/values, refreshed every R network calls (0, the value when R is "
                        "left out: never) and at block starts; default off")
    p.add_argument("--prompt-padding", "--prompt_padding", choices=PROMPT_PADDINGS,
                   help="pad id of prompt rows: the tokenizer's declared pad token (default for a converted "
                        "checkpoint) or EOS (default for a training workdir)")
    p.add_argument("--decoding", default="first_eos", choices=DECODINGS,
                   help="text up to the first EOS, or the release's (whole caption without </s>)")
    p.add_argument("--image-latents", "--image_latents", default="mean", choices=IMAGE_LATENTS,
                   help="caption/VQA image condition: VAE posterior mean, or a draw (the release)")
    p.add_argument("--length", type=int, help="caption tokens generated at most (default: the whole row)")
    p.add_argument("--min-new-tokens", "--min_new_tokens", type=int, default=0, help="EOS banned before this")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--image-size", "--image_size", type=int, help="default: the checkpoint's")
    p.add_argument("--text-length", "--text_length", type=int,
                   help="tokens per text row, every task (default: 256 for prompts and 128 for captions and "
                        "VQA, a workdir's trained length when shorter)")
    p.add_argument("--batch-size", "--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG grid (t2i, inpaint) or JSON file (caption, vqa)")
    # ---- where it runs (inference/sharded.py) and the TPU dry run (aot/inference_report.py)
    for axis in ("data", "fsdp", "tensor"):
        p.add_argument(f"--mesh-{axis}", f"--mesh_{axis}", type=int, dest=f"mesh_{axis}",
                       help="mesh size (default: every device on data, weights replicated when they fit, else "
                            "sharded over the fewest fsdp devices that hold them)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--param-dtype", "--param_dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype the weights are held in (bfloat16: half the memory per device)")
    p.add_argument("--dry_run", "--dry-run", action="store_true",
                   help="with --topology: compile only (in bfloat16 whatever --dtype / --param-dtype say)")
    p.add_argument("--topology", help="a Cloud TPU slice to compile for, e.g. v5e-8 (needs --dry_run)")
    return p.parse_args(argv)


def read_image(path: str, size: int) -> np.ndarray:
    """uint8 (size, size, 3): RGB, shorter side resized (bicubic, antialiased), center crop."""
    from dual_diffusion.evaluation.suites import EvalDataError
    from dual_diffusion.evaluation.suites import read_image as read

    try:
        return read(Path(path), size)
    except EvalDataError as e:
        raise UsageError(str(e)) from None


def save_grid(images: np.ndarray, path: str, columns: int) -> None:
    """uint8 (N, S, S, 3) -> one PNG, `columns` images per row."""
    from PIL import Image

    n, s = len(images), images.shape[1]
    rows = -(-n // columns)
    grid = np.full((rows * s, columns * s, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * s:(r + 1) * s, c * s:(c + 1) * s] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UsageError(f"cannot read --prompts-file {args.prompts_file}: {e}") from None
    if not prompts:
        raise UsageError(f"--task={args.task} needs --prompt or --prompts-file")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UsageError(f"prompt(s) {empty} are empty")
    return prompts


def _check(args) -> None:
    from dual_diffusion.checkpoints.paths import workdir_path

    if getattr(args, "topology", None) or getattr(args, "dry_run", False):
        return  # aot/inference_report.py checks its own flags
    if not args.checkpoint:
        raise UsageError("--checkpoint is required (unless --dry_run --topology=...)")
    if not workdir_path(args.checkpoint).is_dir():  # pathlib would turn gs://b/x into the local gs:/b/x
        raise UsageError(f"--checkpoint={args.checkpoint}: no such folder")
    needs_image = args.task in ("caption", "vqa", "inpaint")
    if needs_image and not args.image:
        raise UsageError(f"--task={args.task} needs --image")
    for path in args.image + args.mask:
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
    if args.task == "vqa" and (not args.question or len(args.question) not in (1, len(args.image))):
        raise UsageError("--task=vqa needs one --question, or one per --image")
    if args.task == "vqa" and any(not q.strip() for q in args.question):
        raise UsageError("empty --question")
    if args.task == "inpaint" and len(args.mask) != len(args.image):
        raise UsageError(f"--task=inpaint needs one --mask per --image ({len(args.mask)} for {len(args.image)})")
    for name in ("steps", "num_images", "batch_size", "length", "num_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}={value}: expected >= 1")


def text_options(args):
    """TextOptions of a caption / VQA run: the flags, else the release's steps for the task."""
    from dual_diffusion.inference.pipelines import TextOptions

    try:
        return TextOptions(steps=args.steps or TEXT_STEPS["caption" if args.task == "caption" else "vqa"],
                           method=args.sampler, temperature=args.temperature, min_new_tokens=args.min_new_tokens,
                           decoding=args.decoding, image_latents=args.image_latents, threshold=args.threshold,
                           factor=args.factor, num_blocks=args.num_blocks, image_cache=args.image_cache)
    except ValueError as e:
        raise UsageError(str(e)) from None


def fast_settings(opts) -> dict:
    """The fast-decoding settings of TextOptions that apply to its method, for the printed JSON."""
    out = {"image_cache": opts.image_cache}
    if opts.method in ("semi_ar", "threshold"):
        out["num_blocks"] = opts.num_blocks
    if opts.method == "threshold":
        out.update({"factor": opts.factor} if opts.factor is not None else {"threshold": opts.threshold})
    return out


def _map(fn, columns: list, args, desc: str) -> list:
    """fn over the items in batches of --batch-size (evaluation.stream.map_batches); usage errors say why."""
    from dual_diffusion.evaluation.stream import map_batches

    n = len(columns[0])
    try:
        return map_batches(fn, columns, min(args.batch_size, n), desc=desc, progress=n > args.batch_size)[0]
    except ValueError as e:
        raise UsageError(str(e)) from None


def run(args) -> dict | None:
    """Does the task; returns what was written (paths and/or texts); None on processes other than 0."""
    _check(args)
    if args.topology or args.dry_run:
        from dual_diffusion.aot import inference_report

        return inference_report.run(args)
    from dual_diffusion import distributed
    from dual_diffusion.inference import sharded
    from dual_diffusion.inference.pipelines import ImageOptions, Pipeline
    from dual_diffusion.models.configs import Runtime

    distributed.initialize_from_env()
    try:
        bundle, mesh, choice = sharded.load_on_mesh(args.checkpoint, Runtime(dtype=args.dtype,
                                                                     param_dtype=args.param_dtype),
                                                    data=args.mesh_data, fsdp=args.mesh_fsdp, tensor=args.mesh_tensor)
    except sharded.MeshError as e:
        raise UsageError(str(e)) from None
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"cannot load --checkpoint={args.checkpoint}: {e}") from None
    pipe = Pipeline.from_bundle(bundle, image_size=args.image_size, text_length=args.text_length, mesh=mesh,
                                prompt_padding=args.prompt_padding)
    states = bundle.states
    result: dict = {"checkpoint": args.checkpoint, "task": args.task, "mesh": sharded.describe_mesh(mesh, choice)}

    if args.task in ("t2i", "inpaint"):
        opts = ImageOptions(steps=args.steps or 28, cfg_scale=args.cfg, shift=args.shift, grid=args.grid)
        result["settings"] = dict(steps=opts.steps, cfg=opts.cfg_scale, shift=opts.shift, grid=opts.grid,
                                  text_length=pipe.text_length, image_size=pipe.image_size, pad_id=pipe.pad_id)
        prompts = _prompts(args)
        if args.task == "t2i":
            jobs = [p for p in prompts for _ in range(args.num_images)]
            images = np.stack(_map(lambda batch, indices: pipe.text_to_image(
                states, batch, seed=args.seed, indices=indices, opts=opts,
                negative_prompts=[args.negative_prompt] * len(batch)), [jobs], args, "images"))
            columns = args.num_images if args.num_images > 1 else min(len(jobs), 8)
        else:
            if len(prompts) not in (1, len(args.image)):
                raise UsageError("--task=inpaint needs one --prompt, or one per --image")
            prompts = prompts * len(args.image) if len(prompts) == 1 else prompts
            images = np.stack([read_image(p, pipe.image_size) for p in args.image])
            keep = np.stack([read_image(m, pipe.image_size).mean(-1) < 128 for m in args.mask])
            images = np.stack(_map(lambda im, k, p, indices: pipe.inpaint(states, im, k, p, seed=args.seed,
                                                                          indices=indices, opts=opts),
                                   [images, keep, prompts], args, "inpaint"))
            columns = min(len(prompts), 8)
        path = args.out or f"{args.task}.png"
        if sharded.is_main():
            save_grid(images, path, columns)
        result.update(prompts=prompts, images=len(images), out=path)
    else:
        opts = text_options(args)
        length = pipe.caption_text_length if args.task == "caption" else pipe.vqa_text_length
        result["settings"] = dict(steps=opts.steps, sampler=opts.method, decoding=opts.decoding,
                                  image_latents=opts.image_latents, text_length=length, image_size=pipe.image_size,
                                  **fast_settings(opts))
        images = np.stack([read_image(p, pipe.image_size) for p in args.image])
        questions = (args.question * len(images) if len(args.question) == 1 else args.question) \
            if args.task == "vqa" else None
        if args.task == "caption":
            texts = _map(lambda im, indices: pipe.caption(states, im, seed=args.seed, indices=indices,
                                                          length=args.length, opts=opts), [images], args, "caption")
        else:
            texts = _map(lambda im, q, indices: pipe.answer(states, im, q, seed=args.seed, indices=indices,
                                                            opts=opts), [images, questions], args, "vqa")
        result["nfe"] = pipe.mean_text_calls(args.task)  # network calls per row, mean
        key = "captions" if args.task == "caption" else "answers"
        result[key] = [dict(image=p, **({"question": q} if questions else {}), text=t)
                       for p, q, t in zip(args.image, questions or [None] * len(texts), texts)]
        if args.out and sharded.is_main():
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2))
            result["out"] = args.out
    return result if sharded.is_main() else None


def main(argv=None) -> int:
    return run_command(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
