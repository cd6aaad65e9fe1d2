"""Training metrics: WORKDIR/metrics.jsonl + TensorBoard event files (process 0 writes).

One JSON object per logged step: step, loss, loss_image, loss_text, grad_norm,
lr, samples_per_sec (+ nonfinite_total). TensorBoard gets the same scalars
under train/<name> in WORKDIR/tensorboard. A resumed run appends; lines of
steps after the resume point (from an earlier run that died before its next
checkpoint) are dropped first, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np


def _scalar(x):
    x = np.asarray(x)
    return x.item() if x.size == 1 else x.tolist()


class MetricsWriter:
    def __init__(self, workdir: str | Path, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        if self.path.exists():
            self._truncate_after(resume_step)
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:  # tensorboardX is in setup.py; keep training without it
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, step: int, scalars: dict) -> dict:
        row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        if not self.enabled:
            return row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
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
    """Samples per second between two log points (both halves count: 2 x batch per step)."""

    def __init__(self):
        self._t, self._step = time.perf_counter(), None

    def rate(self, step: int, samples_per_step: int) -> float:
        now = time.perf_counter()
        if self._step is None:
            self._t, self._step = now, step
            return 0.0
        rate = (step - self._step) * samples_per_step / max(now - self._t, 1e-9)
        self._t, self._step = now, step
        return rate
