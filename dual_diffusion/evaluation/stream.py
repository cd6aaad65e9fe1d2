"""Streaming items through a pipeline in global batches, with a progress bar, throughput and resume.

    journal = PartialResults.open(OUT / "partial_vqav2.jsonl", settings)   # None: no resume
    answers, speed = map_batches(fn, [images, questions], batch_size, desc="vqav2", journal=journal, part="vqa")

`fn(*column_chunks, indices=global item indices)` returns one JSON-friendly result per row.
Batches have one size (the last padded by repeating its final item, the extra results
dropped), so every call compiles once; the pipeline splits each batch over the mesh
(inference/sharded.py). A tqdm bar counts items, with items/s and an ETA, on the main
process only; `speed` is {"items", "seconds", "items_per_s"} of the items this run made.

Resume: the journal is a JSON-lines file in the output folder, written and flushed by the
main process after every batch: its first line holds the settings, each later line one
batch's results as [index, result] pairs of one suite part. Reopened with the same
settings, items it holds are skipped and their results reused (a line cut short by a kill
is dropped); other settings are one error naming what differs (unless it holds no result
yet: then it starts over). Every process reads the
main process's copy (sharded.broadcast_text), so all skip the same items. When the suite
finishes, `close()` renames it to items_<suite>.jsonl: the per-item record of the run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dual_diffusion.inference.sharded import broadcast_text, is_main


_FAILED = "\0failed: "  # what the main process broadcasts instead of the file when it cannot use it


class ResumeError(ValueError):
    """A partial results file that cannot be continued; the message says why and what to do."""


class PartialResults:
    """The journal of one evaluation (see the module docstring)."""

    def __init__(self, path: Path, settings: Mapping, done: dict[str, dict[int, Any]]):
        self.path, self.settings, self.done = Path(path), dict(settings), done

    @classmethod
    def open(cls, path, settings: Mapping) -> "PartialResults":
        """Continues `path` when it exists (same settings), else starts it; every process gets its content."""
        path = Path(path)
        settings = json.loads(json.dumps(settings))  # as it reads back from the file
        text = ""
        if is_main():
            try:
                text = _valid_lines(path, settings) if path.exists() else json.dumps({"settings": settings}) + "\n"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text)
                os.replace(tmp, path)  # the dropped half-line is gone before anything is appended
            except (ResumeError, OSError) as e:  # every process must hear of it, or the others wait forever
                text = _FAILED + str(e)
        text = broadcast_text(text)
        if text.startswith(_FAILED):
            raise ResumeError(text[len(_FAILED):])
        lines = text.splitlines()
        done: dict[str, dict[int, Any]] = {}
        for line in lines[1:]:
            record = json.loads(line)
            done.setdefault(record["part"], {}).update((int(i), r) for i, r in record["items"])
        return cls(path, settings, done)

    def add(self, part: str, indices: Sequence[int], results: Sequence) -> None:
        """Records one batch (main process: appended, flushed and synced before the next batch)."""
        self.done.setdefault(part, {}).update(zip(map(int, indices), results))
        if not is_main():
            return
        line = json.dumps({"part": part, "items": [[int(i), r] for i, r in zip(indices, results)]})
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def close(self, final: Path) -> None:
        """The run is complete: the journal becomes `final` (main process)."""
        if is_main():
            os.replace(self.path, final)


def _valid_lines(path: Path, settings: dict) -> str:
    """The file's header and complete lines; ResumeError when its settings differ or it is damaged."""
    lines = path.read_text().splitlines()
    try:
        old = json.loads(lines[0])["settings"]
    except (IndexError, KeyError, TypeError, json.JSONDecodeError):
        raise ResumeError(f"{path} is not a partial results file (no settings line): delete it or pick another "
                          "--out_dir") from None
    if old != settings and not any(line.strip() for line in lines[1:]):  # nothing made yet: start over
        return json.dumps({"settings": settings}) + "\n"
    if old != settings:
        diff = "; ".join(f"{k}: {old.get(k)!r} in the file, {settings.get(k)!r} now"
                         for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        raise ResumeError(f"{path} holds results made with other settings ({diff}): rerun with the same settings "
                          "to continue it, or delete it to start over")
    kept = [lines[0]]
    for n, line in enumerate(lines[1:], 2):
        try:
            record = json.loads(line)
            if not (isinstance(record.get("part"), str) and isinstance(record.get("items"), list)):
                raise ValueError("not a batch record")
        except ValueError as e:
            if n == len(lines):  # the line being written when the run was killed
                break
            raise ResumeError(f"{path}:{n}: damaged ({e}); delete the file to start over") from None
        kept.append(line)
    return "\n".join(kept) + "\n"


def map_batches(fn: Callable[..., Sequence], columns: Sequence[Sequence], batch_size: int, *, desc: str,
                progress: bool = True, journal: PartialResults | None = None,
                part: str | None = None) -> tuple[list, dict]:
    """(results of every item in order, speed of this run); see the module docstring."""
    from tqdm import tqdm

    n = len(columns[0])
    if any(len(c) != n for c in columns):
        raise ValueError(f"map_batches: columns of lengths {[len(c) for c in columns]}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    done = journal.done.get(part or desc, {}) if journal is not None else {}
    todo = np.asarray([i for i in range(n) if i not in done], np.int64)
    results = dict(done)
    t0, made = time.perf_counter(), 0
    with tqdm(total=n, initial=n - len(todo), desc=desc, unit="item", disable=not progress or not is_main()
              or n == 0) as bar:
        for start in range(0, len(todo), batch_size):
            real = todo[start:start + batch_size]
            rows = np.concatenate([real, np.full(batch_size - len(real), real[-1])])
            chunks = [column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows]
                      for column in columns]
            out = list(fn(*chunks, indices=rows))[:len(real)]
            results.update(zip(real.tolist(), out))
            if journal is not None:
                journal.add(part or desc, real.tolist(), out)
            made += len(real)
            bar.update(len(real))
    seconds = time.perf_counter() - t0
    speed = {"items": made, "seconds": round(seconds, 3),
             "items_per_s": round(made / seconds, 3) if made and seconds > 0 else None}
    return [results[i] for i in range(n)], speed
