"""Data-pipeline throughput: `benchmark_data(...)` (the benchmark CLI calls it).

Writes `num_images` synthetic JPEG photos (default 512x384, quality 90) and a
release-style JSON metadata list to a temporary folder (or reads an existing
metadata file), runs the full dual pipeline (decode, resize+crop, normalise,
tokenize, both streams from that source) and reports samples per second, where
a sample is one image-text example of either stream. With worker_count=0 it also
reports samples per CPU-second of this process (robust to a shared, loaded machine).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dual_diffusion.data import pipeline


def write_jpeg_dataset(root: str | Path, num_images: int, size=(512, 384), seed: int = 0) -> str:
    """Smooth color fields + noise, so JPEG sizes/decoding costs resemble photos."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    meta = []
    for i in range(num_images):
        f = rng.uniform(0.005, 0.05, size=(3, 2))
        base = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + i) for c in range(3)], -1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:05d}.jpg", quality=90)
        meta.append({"image_path": f"{i:05d}.jpg", "caption": f"a synthetic photo number {i}",
                     "re_caption": f"a detailed synthetic photograph of smooth color waves, number {i}"})
    path = root / "meta.json"
    path.write_text(json.dumps(meta))
    return str(path)


class _ByteTokenizer:
    """Stand-in with T5's interface when no tokenizer is given (bytes + 3)."""
    eos_id, pad_id = 1, 0

    def encode(self, text, add_eos=True):
        return [b + 3 for b in text.encode()] + ([1] if add_eos else [])


def benchmark_data(metadata: str | None = None, *, tokenizer=None, num_images: int = 256,
                   image_size: int = 256, text_length: int = 64, batch_size: int = 32,
                   worker_count: int = 2, warmup_batches: int = 3, batches: int = 20) -> dict:
    """Returns {"samples_per_s", "batches_per_s", "seconds", ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        if metadata is None:
            metadata = write_jpeg_dataset(tmp, num_images)
        cfg = pipeline.default_data_config()
        cfg.t2i_sources = [dict(kind="json", path=metadata, weight=1.0)]
        cfg.i2t_sources = [dict(kind="json", path=metadata, weight=1.0)]
        cfg.image_size, cfg.text_length, cfg.worker_count = image_size, text_length, worker_count
        it = pipeline.make_dual_iterator(cfg, tokenizer or _ByteTokenizer(), global_batch_size=batch_size)
        try:
            for _ in range(warmup_batches):
                next(it)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(batches):
                batch = next(it)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            del batch
        finally:
            if hasattr(it, "close"):
                it.close()
    samples = 2 * batch_size * batches  # t2i + i2t examples
    out = {"samples_per_s": samples / seconds, "batches_per_s": batches / seconds, "seconds": seconds,
           "image_size": image_size, "batch_size": batch_size, "worker_count": worker_count}
    if worker_count == 0:  # all work is in this process: a load-independent figure
        out["samples_per_cpu_s"] = samples / cpu
    return out


if __name__ == "__main__":
    print(json.dumps(benchmark_data(), indent=2))
