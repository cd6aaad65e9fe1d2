r"""Quality against cost of the text samplers on a shapes-world checkpoint (README, Sampling).

    python tools/text_decoding_table.py --checkpoint=WORKDIR [--num=400] [--seed=1234] [--batch_size=50]
        [--taus=0.7,0.8,0.9,0.95] [--image_cache=0] [--num_blocks=4] [--temperature=0] [--out=table.md]

Rows: the release's sampler (ancestral, temperature 1, 64 caption / 32 VQA steps), the confidence
sampler and the threshold sampler at each TAU (the same step budgets, `--temperature`), each without
and with the image K/V cache (refresh every `--image_cache` calls and at block starts). Columns: mean
network calls per row (`nfe`, each row's own count), seconds per row (wall time after compiling, this
machine: compare within one table), caption attribute accuracy and VQA accuracy on the shapes
evaluation sets (`--num` items each, `--seed`), and for the cache rows the share of rows whose
generated ids are identical to the same sampler's without the cache (same seed). Prints the markdown
table (also written to `--out`) and one JSON line per row on stderr.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error of the project's commands
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training workdir or converted checkpoint (shapes world)")
    p.add_argument("--num", type=int, default=400, help="captions and VQA questions, each")
    p.add_argument("--seed", type=int, default=1234, help="seed of the evaluation sets and the samplers")
    p.add_argument("--batch_size", type=int, default=50, help="rows per call (divides --num)")
    p.add_argument("--taus", default="0.7,0.8,0.9,0.95", help="thresholds of the threshold sampler")
    p.add_argument("--image_cache", type=int, default=0, help="R of the cache rows (0: block starts only)")
    p.add_argument("--num_blocks", type=int, default=4, help="blocks of the threshold sampler")
    p.add_argument("--temperature", type=float, default=0.0, help="of the confidence and threshold rows")
    p.add_argument("--min_new_tokens", type=int, default=0, help="EOS ban on the first N generated tokens")
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args(argv)
    if args.num < 1 or args.batch_size < 1 or args.num % args.batch_size:
        p.error(f"--num={args.num} must be a positive multiple of --batch_size={args.batch_size}")
    return args


def samplers(args) -> list[tuple[str, dict]]:
    """(row name, TextOptions fields except steps and cache) in table order."""
    greedy = dict(temperature=args.temperature, min_new_tokens=args.min_new_tokens)
    rows = [("release ancestral", dict(method="ancestral", temperature=1.0, min_new_tokens=args.min_new_tokens)),
            ("confidence", dict(method="confidence", **greedy))]
    rows += [(f"threshold {tau:g}", dict(method="threshold", threshold=tau, num_blocks=args.num_blocks, **greedy))
             for tau in (float(t) for t in args.taus.split(","))]
    return rows


def decode_set(pipe, states, images, rows, opts, task: str, batch_size: int, seed: int):
    """(generated ids (n, L), network calls per row (n,), seconds per row): every batch once to compile,
    then timed."""
    import numpy as np

    ids, fixed = rows
    run = lambda start: pipe.fill_text(states, images[start:start + batch_size], ids[start:start + batch_size],  # noqa: E731
                                       fixed[start:start + batch_size], seed=seed,
                                       indices=np.arange(start, min(start + batch_size, len(images))),
                                       opts=opts, task=task)
    run(0)  # compile
    pipe.text_calls[task].clear()
    begin = time.perf_counter()
    out = np.concatenate([run(start) for start in range(0, len(images), batch_size)])
    sec = (time.perf_counter() - begin) / len(images)
    return out, np.asarray(pipe.text_calls[task]), sec


def measure(args) -> tuple[list[dict], dict]:
    import numpy as np

    from dual_diffusion.checkpoints.pretrained import load_pretrained
    from dual_diffusion.data import shapes_eval
    from dual_diffusion.inference.pipelines import TEXT_STEPS, Pipeline, TextOptions

    try:
        bundle = load_pretrained(args.checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: cannot load --checkpoint={args.checkpoint}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    pipe = Pipeline.from_bundle(bundle)
    caps = shapes_eval.caption_eval_set(args.seed, args.num, pipe.image_size)
    vqa = shapes_eval.vqa_eval_set(args.seed, args.num, pipe.image_size)
    tasks = {"caption": (caps.images, pipe.caption_rows(args.num)),
             "vqa": (vqa.images, pipe.vqa_rows(vqa.questions))}
    out = []
    for name, fields in samplers(args):
        plain = {}
        for cache in (None, args.image_cache):
            row = dict(sampler=name, image_cache=cache, **fields)
            for task, (images, rows) in tasks.items():
                opts = TextOptions(steps=TEXT_STEPS[task], image_cache=cache, **fields)
                ids, calls, sec = decode_set(pipe, bundle.states, images, rows, opts, task, args.batch_size,
                                             args.seed)
                texts = pipe.decode_generated(ids, rows[1], task=task)
                if task == "caption":
                    row["caption_attribute_accuracy"] = shapes_eval.evaluate_captions(texts, caps.scenes)[
                        "attribute_accuracy"]
                else:
                    row["vqa_accuracy"] = shapes_eval.evaluate_vqa(texts, vqa.answers)["accuracy"]
                row[f"{task}_nfe"], row[f"{task}_sec_per_row"] = float(calls.mean()), sec
                if cache is None:
                    plain[task] = ids
                else:
                    row[f"{task}_identical"] = float(np.mean(np.all(ids == plain[task], axis=1)))
            print(json.dumps(row), file=sys.stderr, flush=True)
            out.append(row)
    return out, dict(step=bundle.info.get("step"), caption_length=pipe.caption_text_length,
                     vqa_length=pipe.vqa_text_length)


def markdown(rows: list[dict], args, facts: dict) -> str:
    import jax

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    head = (f"Text decoding on {args.checkpoint} (step {facts['step']}), {args.num} captions and {args.num} VQA "
            f"questions of the shapes evaluation sets (seed {args.seed}), batch {args.batch_size}, "
            f"{facts['caption_length']}-token caption / {facts['vqa_length']}-token VQA rows; "
            f"{datetime.date.today()}, {platform.node()} ({os.cpu_count()} CPUs), jax {jax.__version__}.\n\n")
    lines = ["| sampler | image cache | calls/caption | calls/answer | s/caption | s/answer | caption attr. acc. "
             "| VQA acc. | identical captions / answers |", "|" + " --- |" * 9]
    for r in rows:
        same = (f"{r['caption_identical']:.3f} / {r['vqa_identical']:.3f}" if r["image_cache"] is not None else "")
        lines.append(f"| {r['sampler']} | {'R=' + str(r['image_cache']) if r['image_cache'] is not None else 'off'} "
                     f"| {f(r['caption_nfe'], '.2f')} | {f(r['vqa_nfe'], '.2f')} | {f(r['caption_sec_per_row'], '.4f')} "
                     f"| {f(r['vqa_sec_per_row'], '.4f')} | {f(r['caption_attribute_accuracy'], '.3f')} "
                     f"| {f(r['vqa_accuracy'], '.3f')} | {same} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        print(f"error: --checkpoint={args.checkpoint}: no such folder", file=sys.stderr)
        return 2
    rows, facts = measure(args)
    table = markdown(rows, args, facts)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
