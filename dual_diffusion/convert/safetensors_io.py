"""Reads and writes .safetensors files with numpy only (no PyTorch, no pickle).

Format: 8-byte little-endian header length N, N bytes of JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes (offsets relative to the end of the header).
Tensors are returned as read-only `np.memmap` views, so reading a 10 GB file
costs page cache, not resident memory.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 64 * 2**20
_MAX_HEADER = 100 * 2**20  # the reference implementation's limit; guards against garbage lengths


class SafetensorsError(ValueError):
    """A safetensors file (or folder of shards) that cannot be read as promised."""


def dtype_name(dtype) -> str:
    """Safetensors dtype string of a numpy dtype (e.g. 'BF16')."""
    dtype = np.dtype(dtype)
    if dtype.newbyteorder("<") in _NAMES:
        return _NAMES[dtype.newbyteorder("<")]
    if dtype in _NAMES:
        return _NAMES[dtype]
    raise SafetensorsError(f"dtype {dtype} has no safetensors name; supported: {sorted(DTYPES)}")


class SafetensorsFile:
    """One .safetensors file: header parsed and validated up front, tensors memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise SafetensorsError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors file ({size} bytes, no header length)")
            n = int.from_bytes(head, "little")
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{self.path}: header length {n} does not fit the file size {size} "
                                       "(truncated or not a safetensors file)")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype_str, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsError(f"{self.path}: malformed header entry for {key!r}: {info!r}") from None
            if dtype_str not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {key!r} has unknown dtype {dtype_str!r}; "
                                       f"supported: {sorted(DTYPES)}")
            dtype = DTYPES[dtype_str]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise SafetensorsError(f"{self.path}: tensor {key!r} {dtype_str}{list(shape)} needs {nbytes} bytes "
                                       f"but its data_offsets are [{begin}, {end}]")
            if end > data_size:
                raise SafetensorsError(f"{self.path}: truncated file: tensor {key!r} ends at byte {end} of the data "
                                       f"section but only {data_size} bytes are present")
            self._entries[key] = (dtype, shape, begin, end)
        # One map of the whole data section, made now: later reads see this file even if the path is replaced.
        self._data = (np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start, shape=(data_size,))
                      if data_size else np.zeros(0, np.uint8))

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> np.dtype:
        return self._entry(key)[0]

    def _entry(self, key: str):
        if key not in self._entries:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        return self._entries[key]

    def get(self, key: str) -> np.ndarray:
        """The tensor as a read-only view of the file's memory map (zero-size tensors as a plain empty array)."""
        dtype, shape, begin, end = self._entry(key)
        if end == begin:
            return np.zeros(shape, dtype)
        return self._data[begin:end].view(dtype).reshape(shape)


class TensorSource(Mapping[str, np.ndarray]):
    """All tensors of a model folder, from one file or from shards listed in an index json."""

    def __init__(self, files: Mapping[str, SafetensorsFile], description: str):
        self._where = dict(files)  # key -> file
        self.description = description

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, stem: str) -> "TensorSource":
        """`folder/stem.safetensors`, or the shards named by `folder/stem.safetensors.index.json`."""
        folder = Path(folder)
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            f = SafetensorsFile(single)
            return cls({k: f for k in f.keys()}, str(single))
        if not index.is_file():
            raise SafetensorsError(f"{folder}: neither {single.name} nor {index.name} is present")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SafetensorsError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
        shards: dict[str, SafetensorsFile] = {}
        where = {}
        for key, name in weight_map.items():
            if name not in shards:
                shards[name] = SafetensorsFile(folder / name)
            if key not in shards[name]:
                raise SafetensorsError(f"{index}: lists {key!r} in {name} but that shard has no such tensor")
            where[key] = shards[name]
        for name, shard in shards.items():
            extra = sorted(set(shard.keys()) - set(weight_map))
            if extra:
                raise SafetensorsError(f"{folder / name}: tensors {extra[:5]} are not listed in {index.name}")
        return cls(where, str(index))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"{self.description}: no tensor {key!r}")
        return self._where[key].get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._where[key].dtype(key)


# A tensor to write: (key, dtype, shape, produce) where produce() returns the array when its turn comes.
PendingTensor = tuple[str, np.dtype, tuple[int, ...], Callable[[], np.ndarray]]


def write_safetensors(path: str | os.PathLike, tensors: Iterable[PendingTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors one at a time: the header is laid out from shapes first, data is produced lazily."""
    tensors = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for key, dtype, shape, produce in tensors:
            array = np.asarray(produce())
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise SafetensorsError(f"{path}: tensor {key!r} was announced as {np.dtype(dtype)}{list(shape)} "
                                       f"but produced {array.dtype}{list(array.shape)}")
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            for start in range(0, flat.size, _CHUNK):  # chunked: no full-size bytes copy
                f.write(memoryview(flat[start:start + _CHUNK]))
    os.replace(tmp, path)


def save_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Writes a dict of in-memory arrays (tests, small files)."""
    write_safetensors(path, [(k, np.asarray(v).dtype, np.shape(v), (lambda v=v: np.asarray(v)))
                             for k, v in tensors.items()], metadata)
