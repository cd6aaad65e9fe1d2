#!/usr/bin/env python3
r"""One sitting on one GPU inside a fixed time budget: the PyTorch anchor and this project's benchmark
side by side, and the demo's GPU variant trained in the gaps and scored.

  launch/bench_gpu.sh OUTDIR                                   # installs carried wheels, then runs this
  python3 launch/gpu_sitting.py --out OUTDIR --budget 560      # from the repository root
  python3 launch/gpu_sitting.py --out /tmp/s --budget 900 --tiny   # the same sequence on CPU, tiny sizes

In order:
1. The demo's GPU variant (`configs/demo.py:gpu`, DEMO_OVERRIDES) starts training in the background in a
   process group of its own, on CPU cores of its own and a small share of GPU memory. It runs while the
   benchmark compiles and is stopped (SIGSTOP) whenever something is timed: for the whole anchor run, and
   inside each of our timed windows (`benchmark --pause_pgid`). Its learning rate is constant after warmup
   and it is stopped by time (SIGTERM: it checkpoints and exits 0), so it may end at any step.
2. The anchor (torch_anchor.py, `--anchor`): train step at batch 4, text to image at 1 and 4 images,
   captions (128 tokens, 64 steps) at 1 and 8.
3. Our benchmark, PARTS in order of importance, one process each, every measurement traced
   (`--profile_dir`); a part is started only while enough time is left before the demo's evaluation.
4. The demo stops; `evaluate --suite=shapes --preset=demo` scores its last checkpoint (EMA weights).
5. OUTDIR/summary.md: the side-by-side table with ratios against the targets, the demo's scores, and the
   top ops of each trace (tools/trace_summary.py). Every log and JSON line stays in OUTDIR.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Our train-step recipe on one 141 GB GPU: no rematerialisation (the fused batch of 16 rows fits; each
# recomputed matmul would be FLOPs the anchor does not spend).
GPU_TRAIN = ["--config.runtime.remat_policy=none"]
# (name, benchmark flags): the targets' measurements first.
PARTS = [
    ("train", ["--what=train", "--batch=8,4,16", *GPU_TRAIN]),
    ("caption_fast", ["--what=caption", "--batch=1,8", "--sampler=confidence"]),
    ("t2i", ["--what=t2i", "--batch=4,1"]),
    ("caption_release", ["--what=caption", "--batch=1,8", "--sampler=ancestral"]),
    ("train_remat", ["--what=train", "--batch=16,32", "--config.runtime.remat_policy=dots_no_batch"]),
]
TINY_PARTS = [
    ("train", ["--what=train", "--batch=2"]),
    ("caption_fast", ["--what=caption", "--batch=1", "--sampler=confidence", "--caption_length=32",
                      "--caption_steps=8"]),
    ("t2i", ["--what=t2i", "--batch=1", "--t2i_steps=2"]),
]
BENCH_CONFIG = "configs/stage2.py"
TINY_BENCH = ["--config=configs/demo.py", "--config.model.transformer.num_layers=1",
              "--config.model.text_encoder.num_layers=1", "--iters=1", "--warmup=1"]
# The demo's GPU variant, stopped by time rather than by step count.
DEMO_OVERRIDES = ["--config.train.num_steps=100000", "--config.optimizer.schedule=constant",
                  "--config.checkpoint.every_steps=1000", "--config.samples.every_steps=1000",
                  "--config.eval.shapes_suite=False", "--config.data.worker_count=3"]
TINY_DEMO = ["--config=configs/demo.py", "--config.train.num_steps=100000", "--config.optimizer.schedule=constant",
             "--config.checkpoint.every_steps=20", "--config.samples.every_steps=20",
             "--config.eval.shapes_suite=False", "--config.train.batch_size=8",
             "--config.model.transformer.num_layers=1", "--config.samples.text_steps=4",
             "--config.samples.image_steps=2"]
TINY_EVAL = ["--per_category=1", "--num_captions=4", "--num_vqa=4"]
EVAL_RESERVE, STOP_GRACE = 100.0, 40.0  # seconds kept for the demo's evaluation and its checkpoint on SIGTERM


class Clock:
    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()


def log(out: Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(out / "sitting.log", "a") as f:
        f.write(line + "\n")


def cpu_split() -> tuple[set[int] | None, set[int] | None]:
    """(ours, the demo's) CPU sets: the demo gets the last quarter where there are 8 cores or more."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 8:
        return None, None
    k = len(cpus) // 4
    return set(cpus[:-k]), set(cpus[-k:])


def run(cmd, out: Path, name: str, timeout: float, env=None, cpus=None, stdout_jsonl: Path | None = None) -> int:
    """Runs cmd (stdout -> OUT/name.out, stderr -> OUT/name.err); JSON lines of stdout are appended to
    stdout_jsonl. Returns the exit status (124 at the timeout)."""
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    with open(out / f"{name}.out", "w") as so, open(out / f"{name}.err", "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se, env=env, preexec_fn=preexec,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
    if stdout_jsonl is not None:
        rows = [l for l in (out / f"{name}.out").read_text().splitlines() if l.startswith("{")]
        with open(stdout_jsonl, "a") as f:
            f.writelines(r + "\n" for r in rows)
    return code


class Demo:
    """The background training: a process group that can be paused, resumed and stopped."""

    def __init__(self, out: Path, args: list[str], env: dict, cpus):
        self.workdir = out / "demo_workdir"
        cmd = [sys.executable, "-m", "dual_diffusion.train", *args, f"--workdir={self.workdir}"]
        self.log = open(out / "demo_train.err", "w")
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=open(out / "demo_train.out", "w"), stderr=self.log,
                                     env=env, preexec_fn=preexec, start_new_session=True)
        self.running_since, self.ran = time.monotonic(), 0.0  # seconds outside the anchor run (for the log)

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self) -> None:
        if self.alive():
            os.killpg(self.pgid, signal.SIGSTOP)
            self.ran += time.monotonic() - self.running_since

    def resume(self) -> None:
        if self.alive():
            os.killpg(self.pgid, signal.SIGCONT)
            self.running_since = time.monotonic()

    def stop(self, grace: float) -> int:
        """SIGTERM (the trainer checkpoints and exits); SIGKILL after `grace` seconds."""
        self.pause()  # counts the last running stretch
        if self.alive():
            os.killpg(self.pgid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def anchor_cmd(anchor: Path, tiny: bool) -> list[str]:
    if tiny:
        return [sys.executable, str(anchor / "torch_anchor.py"), "--tiny", "--batch", "2", "--iters", "1",
                "--what", "train,t2i,i2t"]
    return [sys.executable, str(anchor / "torch_anchor.py"), "--batch", "4", "--iters", "8", "--what",
            "train,t2i,i2t"]


def environment(gpu_mem_fraction: float | None = None) -> dict:
    """The environment of a child: the repository importable; JAX's share of GPU memory when given."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpu_mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{gpu_mem_fraction:.2f}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def sitting(args) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    ours_cpus, demo_cpus = cpu_split()
    machine = subprocess.run([sys.executable, "-c", "import jax, torch; print('jax', jax.__version__, "
                              "jax.devices()); print('torch', torch.__version__)"], capture_output=True, text=True)
    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout if smi else "no nvidia-smi\n"
    (out / "machine.txt").write_text(time.strftime("%Y-%m-%d %H:%M:%S %Z\n") + gpu + machine.stdout + machine.stderr[-2000:])
    log(out, f"machine: {gpu.strip()} | {machine.stdout.strip()}")

    demo = Demo(out, TINY_DEMO if args.tiny else ["--config=configs/demo.py:gpu", *DEMO_OVERRIDES],
                environment(0.10), demo_cpus) if args.demo else None
    log(out, f"demo training started (pgid {demo.pgid})" if demo else "no demo")

    if demo:
        demo.pause()
    code = run(anchor_cmd(args.anchor, args.tiny), out, "anchor", min(args.anchor_timeout, clock.left()),
               env=environment(), cpus=ours_cpus, stdout_jsonl=out / "anchor.jsonl")
    if demo:
        demo.resume()
    log(out, f"anchor: exit {code} at {clock.elapsed():.0f}s")

    bench = [sys.executable, "-m", "dual_diffusion.benchmark"] + (TINY_BENCH if args.tiny else [f"--config={BENCH_CONFIG}"])
    env = environment(0.10 if args.tiny else 0.85)
    skipped = []
    for name, flags in TINY_PARTS if args.tiny else PARTS:
        reserve = EVAL_RESERVE + STOP_GRACE if demo else 0.0
        if clock.left() - reserve < args.min_part:
            skipped.append(name)
            continue
        cmd = bench + flags + [f"--profile_dir={out / 'traces'}"] + ([f"--pause_pgid={demo.pgid}"] if demo else [])
        code = run(cmd, out, f"bench_{name}", clock.left() - reserve, env=env, cpus=ours_cpus,
                   stdout_jsonl=out / "jax.jsonl")
        log(out, f"bench {name}: exit {code} at {clock.elapsed():.0f}s")
    if skipped:
        log(out, f"skipped for time: {skipped}")

    scores = None
    if demo:
        # The demo keeps the GPU alone until its evaluation must start.
        while demo.alive() and clock.left() > EVAL_RESERVE + STOP_GRACE:
            time.sleep(2)
        code = demo.stop(STOP_GRACE)
        log(out, f"demo stopped (exit {code}) at {clock.elapsed():.0f}s after {demo.ran:.0f}s outside the anchor run")
        cmd = [sys.executable, "-m", "dual_diffusion.evaluate", f"--checkpoint={demo.workdir}", "--suite=shapes",
               "--preset=demo", f"--out_dir={out / 'demo_eval'}"] + (TINY_EVAL if args.tiny else [])
        code = run(cmd, out, "demo_eval", clock.left() - 5, env=environment(0.5))
        log(out, f"demo evaluation: exit {code} at {clock.elapsed():.0f}s")
        scores = out / "demo_eval" / "scores.json"
    write_summary(out, scores, skipped)
    log(out, f"done at {clock.elapsed():.0f}s")
    return 0


# --------------------------------------------------------------------------- summary
def _rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.startswith("{")] if path.exists() else []


def comparison(anchor: list[dict], ours: list[dict]) -> list[dict]:
    """Side-by-side rows: (measurement, anchor figure, ours, ratio ours/anchor in the better direction)."""
    a = lambda what, key, val: next((r for r in reversed(anchor) if r["what"] == what and r.get(key) == val), None)
    o = lambda what, batch, **kw: next((r for r in reversed(ours) if r["what"] == what and r.get("batch") == batch
                                        and r.get("sec") and all(r.get(k) == v for k, v in kw.items())), None)
    fitting = [r for r in ours if r["what"] == "train" and r.get("sec") and r["batch"] >= 8]
    best = max(fitting, key=lambda r: r["samples_per_sec"], default=None)
    rows = []

    def add(name, ar, akey, orow, okey, target, lower_is_better=False):
        av, ov = (ar or {}).get(akey), (orow or {}).get(okey)
        ratio = (av / ov if lower_is_better else ov / av) if av and ov else None
        rows.append(dict(measurement=name, anchor=av, ours=ov, ratio=ratio, target=target,
                         ours_row={k: (orow or {}).get(k) for k in ("batch", "remat_policy", "sampler", "compile_sec",
                                                                   "xla_mem_gib", "predictions")}))

    add("train step, batch 4 (samples/s)", a("train_step", "batch", 4), "samples_per_sec", o("train", 4), "samples_per_sec", "")
    add(f"train step, ours at batch {best['batch'] if best else '>=8'} vs anchor at 4 (samples/s)",
        a("train_step", "batch", 4), "samples_per_sec", best, "samples_per_sec", ">= 3x")
    add("t2i 28 steps + CFG, 1 image (images/s)", a("t2i_28steps_cfg", "images", 1), "images_per_sec", o("t2i", 1), "images_per_sec", "")
    add("t2i 28 steps + CFG, 4 images (images/s)", a("t2i_28steps_cfg", "images", 4), "images_per_sec", o("t2i", 4), "images_per_sec", ">= 1.5x")
    for sampler in sorted({r.get("sampler") for r in ours if r["what"] == "caption"}):
        for b in (1, 8):
            add(f"caption 128 tokens, batch {b}, ours {sampler} (s per call)", a("i2t_64steps_128tok", "captions", b),
                "sec", o("caption", b, sampler=sampler), "sec", "latency <= 1/5 (ratio >= 5x)" if b == 1 else "",
                lower_is_better=True)
    return rows


def write_summary(out: Path, scores_path: Path | None, skipped: list[str]) -> None:
    anchor, ours = _rows(out / "anchor.jsonl"), _rows(out / "jax.jsonl")
    lines = [f"# GPU sitting, {time.strftime('%Y-%m-%d')}", "", (out / "machine.txt").read_text().strip(), "",
             "| measurement | anchor | ours | ratio | target |", "| --- | --- | --- | --- | --- |"]
    fmt = lambda v: "" if v is None else f"{v:.3g}"
    for r in comparison(anchor, ours):
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['measurement']} | {fmt(r['anchor'])} | {fmt(r['ours'])} | {ratio} | {r['target']} |")
    lines += ["", "Our rows (what, batch, sec, rate, compile s, XLA GiB, fits):"]
    for r in ours:
        rate = r.get("samples_per_sec") or r.get("images_per_sec") or r.get("tokens_per_sec")
        lines.append(f"- {r['what']} b{r['batch']} {r.get('sampler', '')} {r.get('remat_policy', '')}: sec {fmt(r.get('sec'))}, "
                     f"rate {fmt(rate)}, MFU {fmt(r.get('mfu_vs_989'))}, compile {fmt(r.get('compile_sec'))}, "
                     f"XLA {fmt(r.get('xla_mem_gib'))} GiB, fits {r.get('fits', True)}")
    if skipped:
        lines += ["", f"Skipped for time: {', '.join(skipped)}"]
    if scores_path is not None and scores_path.exists():
        scores = json.loads(scores_path.read_text())
        brief = {k: scores.get(k) for k in ("step", "t2i", "captions", "vqa", "caption_examples")}
        lines += ["", "## Demo (configs/demo.py:gpu, stopped by time)", "", "```", json.dumps(brief, indent=1), "```"]
    traces = out / "traces"
    if traces.is_dir():
        sys.path.insert(0, str(ROOT / "tools"))
        from trace_summary import markdown, summarize
        for d in sorted(p for p in traces.iterdir() if p.is_dir()):
            try:
                lines += ["", f"## Trace {d.name}", "", markdown(summarize(d, top=12))]
            except (FileNotFoundError, ValueError, OSError) as e:
                lines += ["", f"## Trace {d.name}: {e}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=560.0, help="seconds for the whole sitting")
    p.add_argument("--anchor", type=Path, default=ROOT.parent / "shared" / "bench",
                   help="folder of torch_anchor.py and ref_ddit.py")
    p.add_argument("--anchor_timeout", type=float, default=240.0)
    p.add_argument("--min_part", type=float, default=60.0, help="start a benchmark part only with this many seconds left")
    p.add_argument("--no_demo", dest="demo", action="store_false")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: checks the sequence, not speed")
    args = p.parse_args(argv)
    if not (args.anchor / "torch_anchor.py").is_file():
        print(f"error: --anchor={args.anchor}: no torch_anchor.py there", file=sys.stderr)
        return 2
    return sitting(args)


if __name__ == "__main__":
    sys.exit(main())
