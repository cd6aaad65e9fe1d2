"""The two training streams as one grain pipeline (REFERENCE.md, Objectives/Joint).

Per stream (t2i: text-to-image pairs for the image loss; i2t: image-to-text pairs
for the text loss), for each source of the stream's mix:

    source.shuffle(seed_k).repeat()           reshuffled every epoch (grain folds in the epoch)
      [process_index::process_count]          disjoint per-process shards of every epoch
    MapDataset.mix(sources, weights)          weighted interleave
      .random_map(ExampleBuilder)             size filter, decode, resize+crop, [-1, 1], token layout
                                              (its seed differs per process: no draw repeats across them)
      .to_iter_dataset()
    SkipBadIterDataset                        drops and counts bad records
      .batch(b = global_batch // process_count)

then the two streams are zipped into one element per step, and (worker_count > 0)
prefetched by `mp_prefetch` worker processes. Everything is a deterministic
function of (seed, process_index, process_count, worker_count).

Batch (numpy): {"t2i": {"image": f32 (b,H,W,3), "text_ids": i32 (b,L)},
"i2t": {"image", "text_ids", "label_mask": bool (b,L), "fixed_mask": bool (b,L)},
"stats": {"skipped", "truncated", "converted": int64 (this batch, both streams),
plus the same with _t2i / _i2t suffixes}}. A skipped record is counted in the batch
of the next good example of its stream.
Label masks: see text_layout.py (captions: every position incl. EOS padding, as
the release, or with caption_label_padding=False the caption and its first EOS;
VQA: answer + its EOS, or with vqa_label_padding=True (stage 3, the release) the
answer and all the EOS padding after it; fixed_mask: the VQA question prefix).
Images the release's size filter drops (min_image_side, max_aspect_ratio) are
skipped like any bad record and counted in "skipped".

Checkpointing the iterator (grain 0.2.18): `it.get_state()` / `it.set_state(s)`
(a JSON-able dict). With Orbax, save it next to the model:
    mngr.save(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=..., data=grain.checkpoint.CheckpointRestore(it)))
after `mngr = ocp.CheckpointManager(dir, item_handlers={"data": grain.checkpoint.CheckpointHandler()})`
(`grain.python.PyGrainCheckpointHandler`/`PyGrainCheckpointSave` are the same classes). Each
process writes `process_<i>-of-<n>.json`. Resuming needs the same data config,
process count and worker_count; it then continues at the exact next sample.
"""
from __future__ import annotations

import copy
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags, logging

from dual_diffusion.data import sources as sources_lib
from dual_diffusion.data import text_layout
from dual_diffusion.data.shapes import World
from dual_diffusion.data.transforms import ExampleBuilder

STAT_KEYS = ("skipped", "truncated", "converted")


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Lists of {kind: json|wds|tfds|llava|shapes, path, weight, **options} (sources.py).
    c.t2i_sources = [dict(kind="shapes", seed=0, num_records=100_000, weight=1.0)]
    c.i2t_sources = [dict(kind="shapes", seed=1, num_records=100_000, weight=1.0,
                          tasks=("caption", "vqa"))]
    # What the shapes sources draw (shapes.World): the full world by default; saved with the run's
    # config, so the shapes suite scores a checkpoint on the world it trained on.
    c.shapes_world = ml_collections.ConfigDict(World().to_config())
    c.image_size = 256
    c.text_length = 64
    c.seed = 0
    c.original_caption_prob = 0.0   # use the original caption instead of the recaption
    c.vqa_label_padding = False     # VQA label mask: answer + EOS only; True: + all EOS padding (release's stage 3)
    # The release's filter: drop images whose shorter side is under 256 px or whose long/short side ratio is
    # over 4 (0 disables). The side is capped at image_size (transforms.ExampleBuilder): no upscaling, no drop.
    c.min_image_side = 256
    c.max_aspect_ratio = 4.0
    c.caption_label_padding = True  # caption label mask: every position (release); False: caption + first EOS
    c.worker_count = 0              # > 0: mp_prefetch worker processes (production)
    c.prefetch_buffer_size = 2      # batches buffered per worker
    c.read_threads = 2              # threads per process reading/decoding records
    c.read_prefetch = 32            # records read ahead per stream
    c.max_consecutive_bad = 1000    # that many bad records in a row: the run stops, naming the sources
    return c


class SkipBadIterDataset(grain.IterDataset):
    """Drops records marked bad by ExampleBuilder; the count rides on the next good
    example's "skipped" field, so it is summed into the batch and is part of the
    checkpointable iterator state (no global counters, works in worker processes)."""

    def __init__(self, parent: grain.IterDataset, stream: str, max_consecutive_bad: int):
        super().__init__(parent)
        self._stream, self._max_bad = stream, max_consecutive_bad

    def __iter__(self):
        return _SkipBadIterator(self._parent.__iter__(), self._stream, self._max_bad)


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent, stream: str, max_bad: int):
        super().__init__(parent)
        self._stream, self._max_bad, self._pending = stream, max_bad, 0

    def __next__(self):
        bad_sources = []
        while True:
            example = next(self._parent)
            if "_bad" not in example:
                example["skipped"] = np.int32(example["skipped"] + self._pending)
                self._pending = 0
                return example
            self._pending += 1
            bad_sources.append(example["source"])
            if self._pending <= 10 or self._pending % 1000 == 0:
                logging.warning("data %s: skipping %s (%s): %s", self._stream, example["ref"],
                                example["source"], example["_bad"])
            if len(bad_sources) >= self._max_bad:
                raise RuntimeError(f"data stream {self._stream!r}: {len(bad_sources)} bad records in a row "
                                   f"from {sorted(set(bad_sources))}; last: {example['_bad']}")

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "pending": self._pending}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._pending = int(state["pending"])


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class _CaptionLabelsWithoutPadding:
    """Map on built examples: caption rows (no fixed prefix) keep labels up to their first EOS.
    Done here rather than in ExampleBuilder so the builder's interface stays the release's."""

    def __init__(self, eos_id: int):
        self.eos_id = int(eos_id)

    def __call__(self, example: dict) -> dict:
        if "_bad" in example or example["fixed_mask"].any():
            return example
        example = dict(example)
        example["label_mask"] = example["label_mask"] & text_layout.caption_label_mask(example["text_ids"],
                                                                                       self.eos_id)
        return example


def _check_has_valid_record(source, builder: ExampleBuilder) -> None:
    """Scans until the first usable record (one for a healthy source)."""
    rng = np.random.default_rng(0)
    for i in range(len(source)):
        if "_bad" not in builder(source[i], rng):
            return
    raise ValueError(f"data source {source.name!r} has no valid record ({len(source)} records)")


def _stream(specs, tokenizer, cfg, stream: str, batch: int, process_index: int, process_count: int,
            seed: int) -> grain.IterDataset:
    if not specs:
        raise ValueError(f"data config: {stream}_sources is empty")
    builder = ExampleBuilder(tokenizer, image_size=cfg.image_size, text_length=cfg.text_length,
                             stream=stream, original_caption_prob=cfg.original_caption_prob,
                             vqa_label_padding=cfg.vqa_label_padding, min_image_side=cfg.get("min_image_side", 0),
                             max_aspect_ratio=cfg.get("max_aspect_ratio", 0.0))  # absent in older run configs
    parts, weights = [], []
    for k, spec in enumerate(specs):
        spec = dict(spec)
        weight = float(spec.get("weight", 1.0))
        if weight <= 0:
            raise ValueError(f"{stream}_sources[{k}] ({spec.get('kind')}): weight {weight} must be > 0")
        source = sources_lib.build_source(spec, image_size=cfg.image_size, stream=stream,
                                          world=World.from_config(cfg.get("shapes_world")))
        if len(source) < process_count:
            raise ValueError(f"data source {source.name!r} has {len(source)} records, fewer than "
                             f"{process_count} processes")
        _check_has_valid_record(source, builder)
        # Shuffle the whole source (a new permutation per epoch), then deal it out to the
        # processes: each global epoch is split disjointly and completely between them.
        ds = grain.MapDataset.source(source).shuffle(seed=_seed(seed, stream == "i2t", k, 1)).repeat()
        parts.append(ds[process_index::process_count])
        weights.append(weight)
    mixed = grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
    # random_map draws element i's randomness from (seed, i), i counted within this process's share: with
    # several processes the seed takes the process index too, else every process would repeat the same
    # draws (captions vs VQA, which question, which caption) for its i-th example. One process keeps its seed.
    per_process = (process_index,) if process_count > 1 else ()
    mixed = mixed.random_map(builder, seed=_seed(seed, stream == "i2t", 2, *per_process))
    if not cfg.get("caption_label_padding", True):
        mixed = mixed.map(_CaptionLabelsWithoutPadding(tokenizer.eos_id))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_prefetch)
    ds = SkipBadIterDataset(mixed.to_iter_dataset(read), stream, cfg.max_consecutive_bad)
    return ds.batch(batch, drop_remainder=True)


def _assemble(pair: tuple[dict, dict]) -> dict:
    t2i, i2t = pair
    stats = {k: np.int64(t2i[k].sum() + i2t[k].sum()) for k in STAT_KEYS}
    stats.update({f"{k}_{name}": np.int64(part[k].sum()) for name, part in (("t2i", t2i), ("i2t", i2t))
                  for k in STAT_KEYS})
    return {
        "t2i": {"image": t2i["image"], "text_ids": t2i["text_ids"]},
        "i2t": {k: i2t[k] for k in ("image", "text_ids", "label_mask", "fixed_mask")},
        "stats": stats,
    }


def make_dual_dataset(data_config, tokenizer, *, global_batch_size: int, process_index: int = 0,
                      process_count: int = 1, seed: int | None = None) -> grain.IterDataset:
    """The pipeline as a grain IterDataset (see the module docstring)."""
    cfg = copy.deepcopy(data_config)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    seed = cfg.seed if seed is None else seed
    batch = global_batch_size // process_count
    streams = [_stream(cfg[f"{name}_sources"], tokenizer, cfg, name, batch, process_index,
                       process_count, seed) for name in ("t2i", "i2t")]
    ds = grain.experimental.ZipIterDataset(streams).map(_assemble)
    if cfg.worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app (tests, notebooks)
        # nobody parsed them, so take the defaults rather than fail.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.prefetch_buffer_size))
    return ds


def make_dual_iterator(data_config, tokenizer, *, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, seed: int | None = None) -> Any:
    """A grain DatasetIterator of per-process batches; `get_state()`/`set_state()`
    resume at the exact next sample (module docstring: Orbax usage)."""
    return iter(make_dual_dataset(data_config, tokenizer, global_batch_size=global_batch_size,
                                  process_index=process_index, process_count=process_count, seed=seed))
