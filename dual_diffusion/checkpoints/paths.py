"""Paths of workdirs and checkpoints, local or remote (gs://bucket/run), for training and inference alike.

Every path of a workdir is an etils.epath.Path (`workdir_path`), which Orbax, TensorStore and
the lease take as they are; a URL stays a URL (pathlib would turn `gs://b/x` into the local
folder `gs:/b/x`). gs:// needs `gcsfs` installed (epath's backend for it).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
    """False for a URL (gs://bucket/x, s3://...), True for a path on a local (or mounted) disk."""
    return "://" not in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
    """A workdir or checkpoint folder as an epath.Path: a URL as it is (pathlib would turn `gs://b/x` into
    the local folder `gs:/b/x`), a local path made absolute (Orbax takes absolute paths only)."""
    path = os.fspath(path)
    return epath.Path(path if not is_local(path) else os.path.abspath(path))


def local_copy(path: epath.Path) -> Path:
    """`path` itself when it is local, else a copy in a new local temporary folder (for readers such as
    SentencePiece that only open local files)."""
    if is_local(path):
        return Path(os.fspath(path))
    local = Path(tempfile.mkdtemp(prefix="dual_diffusion_")) / path.name
    local.write_bytes(path.read_bytes())
    return local


def atomic_write(path: epath.Path, text: str) -> None:
    """Writes `text` to a temporary name next to `path`, then renames it over `path` (on an object store the
    rename is a copy: readers still see either the old or the new object, never a partial one)."""
    tmp = path.parent / f"{path.name}.tmp"
    tmp.write_text(text)
    tmp.replace(path)
