"""Evaluation suites over a `Pipeline` and network states; each returns a dict of scores.

    scores = shapes_suite(pipeline, states, per_category=50, num_captions=200, num_vqa=200)
    print(markdown_table(scores))

`shapes_suite` scores the built-in shapes world exactly (data/shapes_eval.py):
GenEval-style text to image per category, captions (exact match, attributes),
VQA. `coco_captions_suite` (CIDEr), `vqav2_suite` (VQAv2 accuracy) and
`geneval_suite` (renders GenEval's prompt list for its external scorer) read
benchmark files from disk. Items stream through the pipeline in fixed-size global
batches (evaluation/stream.py: the last one padded, a progress bar with items/s and
an ETA, resume from a `journal`); images from disk are read by the processes whose
devices take them (`ImageFiles`). Each suite's scores hold "throughput": {part:
{"items", "seconds", "items_per_s"}} of the items this run made.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dual_diffusion.evaluation import metrics
from dual_diffusion.evaluation.stream import PartialResults, map_batches
from dual_diffusion.inference.pipelines import ImageOptions, Pipeline, States, TextOptions
from dual_diffusion.inference.sharded import is_main


class EvalDataError(ValueError):
    """A benchmark file or image that cannot be used; the message names it."""


class ImageFiles:
    """Images read from disk on demand: `files[index_array]` -> uint8 (k, size, size, 3) (a lazy row reader
    for the pipelines: each process reads only the rows of its own devices)."""

    def __init__(self, paths: Sequence, size: int):
        self.paths, self.size = list(paths), int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, rows) -> np.ndarray:
        return np.stack([read_image(self.paths[i], self.size) for i in np.asarray(rows).reshape(-1)])


def _digest(image: np.ndarray) -> str:
    """A short fingerprint of a uint8 image, so two runs can be compared item by item."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def check_fits(pipeline: Pipeline, *, prompts: Sequence[str] = (), questions: Sequence[str] = ()) -> None:
    """Every prompt / VQA question fits the pipeline's text length, checked before any sampling runs."""
    from dual_diffusion.data.text_layout import vqa_layout

    try:
        pipeline.encode_prompts(list(dict.fromkeys(prompts)), truncate=False)
    except ValueError as e:
        raise EvalDataError(f"{e}: raise --text_length") from None
    length = pipeline.vqa_text_length
    for q in dict.fromkeys(questions):
        layout = vqa_layout(pipeline.tokenizer, q, "", length)
        if layout.truncated or layout.fixed_mask.all():
            raise EvalDataError(f"question {q[:60]!r} leaves no room for an answer in {length} "
                                "tokens: raise --text_length")


# -------------------------------------------------------------------- shapes
def shapes_suite(pipeline: Pipeline, states: States, *, seed: int = 1234, per_category: int = 50,
                 num_captions: int = 200, num_vqa: int = 200, batch_size: int = 16,
                 image_opts: ImageOptions = ImageOptions(), text_opts: TextOptions = TextOptions(),
                 vqa_opts: TextOptions | None = None, caption_length: int | None = None,
                 world=None, progress: bool = True, journal: PartialResults | None = None) -> dict:
    """Scores on a shapes world (`world`: a data.shapes.World, default the full world) at
    `pipeline.image_size`; a part with count 0 is skipped. Text to image covers the
    categories that apply to the world (shapes_prompts.categories).

    text_opts samples the captions, vqa_opts (default text_opts) the answers. Items are
    keyed by `seed` and their index in each set.

    Returns {"suite", "image_size", "world", "t2i": {category: pass rate, "overall"},
    "captions": {"exact_match", "attribute_accuracy", ...}, "vqa": {"accuracy"}, "throughput"}."""
    from dual_diffusion.data import shapes, shapes_eval

    size, world = pipeline.image_size, world or shapes.FULL_WORLD
    scores: dict[str, Any] = {"suite": "shapes", "image_size": size, "seed": seed, "world": world.to_config(),
                              "throughput": {}}
    stream = dict(progress=progress, journal=journal)
    if per_category > 0:
        specs = shapes_eval.t2i_prompt_set(seed, per_category, world)
        check_fits(pipeline, prompts=[s.prompt for s in specs])

        def t2i(prompts, specs, indices):  # per item: whether it passes, and its fingerprint
            images = pipeline.text_to_image(states, prompts, seed=seed, indices=indices, opts=image_opts)
            return [{"pass": shapes_eval.t2i_passes(im, spec), "digest": _digest(im)}
                    for im, spec in zip(images, specs)]

        items, scores["throughput"]["t2i"] = map_batches(t2i, [[s.prompt for s in specs], specs], batch_size,
                                                         desc="shapes t2i", part="t2i", **stream)
        scores["t2i"] = shapes_eval.t2i_scores([item["pass"] for item in items], specs)
    if num_captions > 0:
        caps = shapes_eval.caption_eval_set(seed, num_captions, size, world)
        preds, scores["throughput"]["captions"] = map_batches(
            lambda im, indices: pipeline.caption(states, im, seed=seed, indices=indices, length=caption_length,
                                                 opts=text_opts),
            [caps.images], batch_size, desc="shapes captions", part="captions", **stream)
        scores["captions"] = shapes_eval.evaluate_captions(preds, caps.scenes)
        scores["caption_examples"] = [{"truth": t, "generated": p} for t, p in zip(caps.captions[:3], preds)]
    if num_vqa > 0:
        vqa = shapes_eval.vqa_eval_set(seed, num_vqa, size, world)
        check_fits(pipeline, questions=vqa.questions)
        answer_opts = text_opts if vqa_opts is None else vqa_opts
        preds, scores["throughput"]["vqa"] = map_batches(
            lambda im, q, indices: pipeline.answer(states, im, q, seed=seed, indices=indices, opts=answer_opts),
            [vqa.images, vqa.questions], batch_size, desc="shapes vqa", part="vqa", **stream)
        scores["vqa"] = shapes_eval.evaluate_vqa(preds, vqa.answers)
    return scores


# ------------------------------------------- the trainer's end-of-training evaluation
def training_sample_options(config) -> tuple[ImageOptions, TextOptions]:
    """The sampling options of a training config (`config.samples`, the loss's text schedule):
    what the trainer's sample rows and its end-of-training suite use. `config` is the
    ml_collections config or the dict of a workdir's config.json."""
    from dual_diffusion.diffusion.masked import Schedule

    s, loss = config["samples"], config["loss"]
    image_opts = ImageOptions(steps=int(s["image_steps"]), cfg_scale=float(s["cfg_scale"]))
    text_opts = TextOptions(steps=int(s["text_steps"]), method=str(s["text_method"]),
                            min_new_tokens=int(s["min_new_tokens"]),
                            schedule=Schedule(str(loss["text_schedule"]), float(loss["text_eps"])))
    return image_opts, text_opts


def training_suite_settings(config) -> dict:
    """Keyword arguments of `shapes_suite` for the trainer's end-of-training evaluation
    (`config.eval.shapes_suite_size` items per set, one batch each, its own seed, the run's world)."""
    n = int(config["eval"]["shapes_suite_size"])
    image_opts, text_opts = training_sample_options(config)
    from dual_diffusion.data.shapes import world_of_run
    from dual_diffusion.data.shapes_prompts import categories

    world = world_of_run(config)
    return dict(seed=4321, per_category=max(1, n // len(categories(world))), num_captions=n, num_vqa=n,
                batch_size=n, image_opts=image_opts, text_opts=text_opts, world=world)


# -------------------------------------------------------------- from disk
def read_image(path: Path, size: int) -> np.ndarray:
    """uint8 (size, size, 3): RGB, shorter side resized (bicubic, antialiased), centre crop."""
    from dual_diffusion.data.transforms import BadRecord, decode_image, resize_center_crop

    try:
        image, _ = decode_image(Path(path).read_bytes(), size_hint=size)
        return resize_center_crop(image, size)
    except (OSError, BadRecord) as e:
        raise EvalDataError(f"cannot read image {path}: {e}") from None


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"cannot read {what} {path}: {e}") from None


def images_by_id(folder: Path) -> dict[int, Path]:
    """{image id: path} for files whose name ends in the id (COCO_val2014_000000000042.jpg, 000000000042.jpg)."""
    if not Path(folder).is_dir():
        raise EvalDataError(f"image folder {folder} does not exist")
    found = {}
    for path in Path(folder).iterdir():
        match = re.search(r"(\d+)$", path.stem)
        if match and path.suffix.lower() in (".jpg", ".jpeg", ".png"):
            found[int(match.group(1))] = path
    return found


def _field(record: Mapping, key: str, where: str):
    if key not in record:
        raise EvalDataError(f"{where}: record {str(record)[:120]} has no {key!r}")
    return record[key]


def coco_captions_suite(pipeline: Pipeline, states: States, *, annotations: Path, images_dir: Path,
                        max_images: int | None = None, batch_size: int = 16, seed: int = 0,
                        text_opts: TextOptions = TextOptions(), caption_length: int | None = None,
                        scorer: Callable[[Mapping, Mapping], dict] = metrics.cider_score,
                        progress: bool = True, journal: PartialResults | None = None) -> dict:
    """Captions of COCO images (captions_val2014.json layout) scored by `scorer` (CIDEr-D)."""
    data = read_json(annotations, "COCO caption annotations")
    if not isinstance(data, dict) or "annotations" not in data:
        raise EvalDataError(f"{annotations}: expected a COCO captions file with 'images' and 'annotations'")
    refs: dict[int, list[str]] = {}
    for a in data["annotations"]:
        refs.setdefault(int(_field(a, "image_id", str(annotations))), []).append(_field(a, "caption", str(annotations)))
    named = {int(im["id"]): Path(images_dir) / im["file_name"] for im in data.get("images", []) if "file_name" in im}
    ids = sorted(refs)[:max_images] if max_images else sorted(refs)
    on_disk = images_by_id(images_dir) if any(not named.get(i, Path("")).is_file() for i in ids) else {}
    paths = [named[i] if named.get(i, Path("")).is_file() else on_disk.get(i) for i in ids]
    absent = [i for i, p in zip(ids, paths) if p is None]
    if absent:
        raise EvalDataError(f"{len(absent)} images (ids {absent[:5]}...) not found in {images_dir}")
    size = pipeline.image_size
    preds, speed = map_batches(lambda p, indices: pipeline.caption(states, ImageFiles(p, size), seed=seed,
                                                                   indices=indices, length=caption_length,
                                                                   opts=text_opts),
                               [paths], batch_size, desc="coco captions", part="captions", progress=progress,
                               journal=journal)
    scores = scorer({i: refs[i] for i in ids}, dict(zip(ids, preds)))
    return {"suite": "coco_captions", "image_size": size, **scores, "throughput": {"captions": speed},
            "caption_examples": [{"image_id": i, "generated": p, "reference": refs[i][0]}
                                 for i, p in zip(ids[:3], preds)]}


def vqav2_suite(pipeline: Pipeline, states: States, *, questions: Path, annotations: Path, images_dir: Path,
                max_questions: int | None = None, batch_size: int = 16, seed: int = 0,
                text_opts: TextOptions = TextOptions(), progress: bool = True,
                journal: PartialResults | None = None) -> dict:
    """VQAv2 accuracy (metrics.vqa_accuracy) on the questions + annotations files (official JSON layout)."""
    qs = read_json(questions, "VQAv2 questions")
    ann = read_json(annotations, "VQAv2 annotations")
    if not isinstance(qs, dict) or "questions" not in qs:
        raise EvalDataError(f"{questions}: expected a VQAv2 questions file with a 'questions' list")
    if not isinstance(ann, dict) or "annotations" not in ann:
        raise EvalDataError(f"{annotations}: expected a VQAv2 annotations file with an 'annotations' list")
    by_qid = {int(_field(a, "question_id", str(annotations))): a for a in ann["annotations"]}
    rows = sorted(qs["questions"], key=lambda q: int(_field(q, "question_id", str(questions))))
    rows = rows[:max_questions] if max_questions else rows
    unanswered = [q["question_id"] for q in rows if int(q["question_id"]) not in by_qid]
    if unanswered:
        raise EvalDataError(f"{annotations} has no answers for question ids {unanswered[:5]}")
    check_fits(pipeline, questions=[q["question"] for q in rows])
    on_disk = images_by_id(images_dir)
    paths = [on_disk.get(int(_field(q, "image_id", str(questions)))) for q in rows]
    absent = sorted({q["image_id"] for q, p in zip(rows, paths) if p is None})
    if absent:
        raise EvalDataError(f"{len(absent)} images (ids {absent[:5]}) not found in {images_dir}")
    size = pipeline.image_size
    preds, speed = map_batches(lambda p, q, indices: pipeline.answer(states, ImageFiles(p, size), q, seed=seed,
                                                                     indices=indices, opts=text_opts),
                               [paths, [q["question"] for q in rows]], batch_size, desc="vqav2", part="vqa",
                               progress=progress, journal=journal)
    answers = [by_qid[int(q["question_id"])] for q in rows]
    humans = [[h["answer"] for h in _field(a, "answers", str(annotations))] for a in answers]
    types = [a.get("answer_type", "other") for a in answers]
    return {"suite": "vqav2", "image_size": size, **metrics.vqa_scores(preds, humans, types),
            "throughput": {"vqa": speed},
            "answer_examples": [{"question": q["question"], "generated": p, "humans": h[:3]}
                                for q, p, h in zip(rows[:3], preds, humans)]}


def read_geneval_prompts(path: Path) -> list[dict]:
    """GenEval's evaluation_metadata.jsonl: one JSON object with a 'prompt' per line."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"cannot read GenEval prompts {path}: {e}") from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise EvalDataError(f"{path}:{n}: expected an object with a 'prompt' string")
        records.append(record)
    return records


def geneval_suite(pipeline: Pipeline, states: States, *, prompts: Sequence[Mapping], out_dir: Path,
                  samples_per_prompt: int = 4, batch_size: int = 16, seed: int = 0,
                  image_opts: ImageOptions = ImageOptions(), progress: bool = True,
                  journal: PartialResults | None = None) -> dict:
    """Renders GenEval prompts as out_dir/<index:05d>/{metadata.jsonl, samples/<k:04d>.png} for its scorer."""
    from PIL import Image

    check_fits(pipeline, prompts=[r["prompt"] for r in prompts])
    out_dir = Path(out_dir)
    for index, record in enumerate(prompts if is_main() else ()):
        folder = out_dir / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(dict(record)) + "\n")
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples_per_prompt)]

    # Images are written (by the main process) as each batch finishes, before the journal records it.
    def render_and_save(job_rows, indices):
        images = pipeline.text_to_image(states, [prompts[i]["prompt"] for i, _ in job_rows], seed=seed,
                                        indices=indices, opts=image_opts)
        if is_main():
            for (i, k), image in dict(zip(map(tuple, job_rows), images)).items():  # padding repeats the last
                Image.fromarray(image).save(out_dir / f"{i:05d}" / "samples" / f"{k:04d}.png")
        return [_digest(image) for image in images]

    _, speed = map_batches(render_and_save, [jobs], batch_size, desc="geneval", part="images", progress=progress,
                           journal=journal)
    return {"suite": "geneval", "image_size": pipeline.image_size, "prompts": len(prompts),
            "images": len(jobs), "out_dir": str(out_dir), "throughput": {"images": speed}}


# ------------------------------------------------------------------ report
def _flatten(scores: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flatten(value, f"{name} / ")
        elif isinstance(value, (int, float, str)) or value is None:
            rows.append((name, value))
    return rows


def markdown_table(scores: Mapping, title: str | None = None) -> str:
    """A two-column markdown table (metric | value) of the scalar scores; nested dicts flattened, lists skipped."""
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ([f"## {title}", ""] if title else []) + ["| metric | value |", "| --- | --- |"]
    lines += [f"| {name} | {fmt(value)} |" for name, value in _flatten(scores)]
    return "\n".join(lines) + "\n"
