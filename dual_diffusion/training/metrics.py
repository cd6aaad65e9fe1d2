"""Training metrics: WORKDIR/metrics.jsonl + TensorBoard event files (process 0 writes).

One JSON object per logged step: step, loss, loss_image, loss_text, grad_norm,
lr, samples_per_sec (+ nonfinite_total). TensorBoard gets the same scalars
under train/<name> in WORKDIR/tensorboard. A resumed run appends; lines of
steps after the resume point (from an earlier run that died before its next
checkpoint) are dropped first, so the file reads as one uninterrupted run, and
a torn last line (a crash in the middle of a write) is dropped with a warning.

An object store (a gs:// workdir) cannot append to an object: there the writer keeps
the rows in memory (the file's rows up to the resume point, read at start) and
rewrites the whole file at each write, through a temporary name and a rename. Its
TensorBoard events go to a local temporary folder (named in the log), since
tensorboardX writes gs:// only with google-cloud-storage installed.

`console` prints the run's own progress lines (stderr, process 0), which stay
visible when absl/Orbax INFO logging is off (the default of train.py).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import logging

from dual_diffusion.cli import UsageError
from dual_diffusion.checkpoints.paths import atomic_write, is_local, workdir_path


class MetricsFileError(UsageError):
    """metrics.jsonl has an unreadable line that is not the last (not a torn write)."""


def console(message: str) -> None:
    """One progress line on stderr (`[HH:MM:SS] message`), from process 0 only."""
    if jax.process_index() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(row: dict, total: int, samples_per_step: int) -> str:
    """`step 25/1600 (2%)  loss 0.5312 (image 0.41, text 0.12)  95.3 samples/s  ETA 8m10s`."""
    step = row["step"]
    parts = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f} (image {row.get('loss_image', float('nan')):.4f}, "
                     f"text {row.get('loss_text', float('nan')):.4f})")
    rate = row.get("samples_per_sec")
    if rate:
        parts.append(f"{rate:.1f} samples/s")
        parts.append(f"ETA {format_duration((total - step) * samples_per_step / rate)}")
    return "  ".join(parts)


def _scalar(x):
    x = np.asarray(x)
    return x.item() if x.size == 1 else x.tolist()


class MetricsWriter:
    def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        workdir = workdir_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._append = is_local(workdir)
        self._lines: list[str] = []  # all rows, for a store that cannot append (rewritten at each write)
        self._tb = None
        if not self.enabled:
            return
        if self.path.exists():
            self._truncate_after(resume_step)
        tb_dir = os.fspath(workdir / "tensorboard")
        if not self._append:
            tb_dir = tempfile.mkdtemp(prefix="dual_diffusion_tensorboard_")
            console(f"TensorBoard events go to the local folder {tb_dir} (not into {workdir}); "
                    f"{self.path} gets every row")
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(tb_dir)
        except ImportError:  # tensorboardX is in setup.py; keep training without it
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """Keeps the rows of steps <= `step` (the resumed one); drops a torn last line with a warning."""
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = []
        for k, line in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if k < len(lines) - 1:
                    raise MetricsFileError(f"{self.path}: line {k + 1} is not JSON ({e.msg}); fix or remove "
                                           "that line") from None
                logging.warning("%s: dropped a torn last line (a crash mid-write): %r", self.path, line[:80])
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        if not self._append:
            self._lines = kept
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, scalars: dict) -> dict:
        row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        if not self.enabled:
            return row
        if self._append:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        else:
            self._lines.append(json.dumps(row))
            atomic_write(self.path, "".join(line + "\n" for line in self._lines))
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)
            self._tb.flush()
        return row

    def write_text(self, step: int, name: str, text: str) -> None:
        if self._tb is not None:
            self._tb.add_text(name, text, step)

    def write_image(self, step: int, name: str, image_HxWx3_uint8: np.ndarray) -> None:
        if self._tb is not None:
            self._tb.add_image(name, image_HxWx3_uint8, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Throughput:
    """Samples per second between two log points (both halves count: 2 x batch per step).

    The clock starts at construction (`start_step`: the step the run starts from), so the
    first interval is measured too. `restart(step)` after the compile excludes it from later
    intervals; a row at that very step still gets the interval that includes the compile.
    """

    def __init__(self, start_step: int = 0):
        self._t, self._step = time.perf_counter(), start_step
        self._before_restart: tuple[float, int] | None = None

    def restart(self, step: int) -> None:
        self._before_restart = (self._t, self._step)
        self._t, self._step = time.perf_counter(), step

    def rate(self, step: int, samples_per_step: int) -> float | None:
        """Samples/s since the previous call; None only when no step was run since then."""
        now = time.perf_counter()
        t0, s0 = self._t, self._step
        if step <= s0 and self._before_restart is not None:
            t0, s0 = self._before_restart
        if step <= s0:
            return None
        self._t, self._step, self._before_restart = now, step, None
        return (step - s0) * samples_per_step / max(now - t0, 1e-9)
