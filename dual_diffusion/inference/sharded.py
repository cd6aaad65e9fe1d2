"""Running the pipelines over a mesh of every device of every process.

    mesh, note = inference_mesh(param_bytes, data=None, fsdp=None, tensor=None)
    pipe = Pipeline.from_bundle(load_pretrained(path, runtime, mesh=mesh), mesh=mesh)

Mesh (`choose_mesh`): sizes not given default to every device of every process on `data`
with the weights replicated, when they take at most WEIGHT_SHARE of one device's memory;
else the fewest `fsdp` shards that bring them under it. A device that reports no memory
(CPU: `memory_stats()` is None) counts as large enough, and the note says so. The
weights' logical rules are sharding.DEFAULT_RULES: `batch` over data x fsdp, so every
device computes its own rows whatever the split.

Batches: a pipeline call pads its rows to a multiple of `batch_multiple` (repeating the
last row), places them with `put_rows` and gathers the result with `fetch`. On several
hosts every process runs the same command with the same inputs; `put_rows` reads only the
rows of this process's devices (a lazy source, such as evaluation.suites.ImageFiles, loads
only those), and `fetch` gathers the whole result to every process
(multihost_utils.process_allgather). Only the main process (`is_main`) writes files and
prints.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dual_diffusion.sharding import DEFAULT_RULES, batch_sharding, logical_to_mesh_spec, make_mesh

# Weights are replicated when they take at most this share of a device's memory; the rest is left to the
# activations. Replicated weights cost no communication, while FSDP gathers every weight on every network call
# (README, Sampling: on v5e-8 a 64-step caption would send 16 s of ICI per call against 0.98 s of compute), so
# the share is as high as one row per chip allows: compiled for v5e, the 7B stack in bf16 (13.15 GiB, 83% of
# 15.75) peaks at 13.51 GiB for captions and 13.60 GiB for 512 px t2i with CFG.
WEIGHT_SHARE = 0.85


def is_main() -> bool:
    """True on the process that writes files and prints (process 0)."""
    return jax.process_index() == 0


def device_memory(device=None) -> int | None:
    """Bytes one device may hold (XLA's `bytes_limit`), or None where the device reports none (CPU)."""
    try:
        stats = (device or jax.local_devices()[0]).memory_stats()
    except Exception:  # noqa: BLE001  (a backend without the query)
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


class MeshError(ValueError):
    """Mesh sizes that do not fit the devices; the message names the flag."""


@dataclasses.dataclass(frozen=True)
class MeshChoice:
    data: int
    fsdp: int
    tensor: int
    note: str  # why: the flags, or the weights against the device memory


def choose_mesh(param_bytes: int, num_devices: int, device_bytes: int | None, *, data: int | None = None,
                fsdp: int | None = None, tensor: int | None = None) -> MeshChoice:
    """Mesh sizes: the given ones, the rest as the module docstring says. Raises MeshError naming the flag."""
    for name, size in (("data", data), ("fsdp", fsdp), ("tensor", tensor)):
        if size is not None and (size < 1 or num_devices % size):
            raise MeshError(f"--mesh_{name}={size}: expected a divisor of the {num_devices} devices")
    tensor = tensor or 1
    if data is not None or fsdp is not None:
        if data is None:
            data = num_devices // (fsdp * tensor) if num_devices % (fsdp * tensor) == 0 else 0
        elif fsdp is None:
            fsdp = num_devices // (data * tensor) if num_devices % (data * tensor) == 0 else 0
        if data * fsdp * tensor != num_devices:
            raise MeshError(f"--mesh_data x --mesh_fsdp x --mesh_tensor must be the {num_devices} devices; "
                             f"got data={data or '?'}, fsdp={fsdp or '?'}, tensor={tensor}")
        return MeshChoice(data, fsdp, tensor, "from the flags")
    rest = num_devices // tensor
    gib = lambda n: f"{n / 2 ** 30:.2f} GiB"  # noqa: E731
    if device_bytes is None:
        return MeshChoice(rest, 1, tensor, f"weights ({gib(param_bytes)}) replicated: the devices report no "
                                           "memory size (CPU), so they are taken to fit")
    budget = WEIGHT_SHARE * device_bytes
    for f in (d for d in range(1, rest + 1) if rest % d == 0):
        if param_bytes / (f * tensor) <= budget:
            how = "replicated" if f == 1 else f"sharded over fsdp={f}"
            return MeshChoice(rest // f, f, tensor, f"weights ({gib(param_bytes)}) {how}: at most "
                                                    f"{WEIGHT_SHARE:.0%} of a device's {gib(device_bytes)}")
    raise MeshError(f"the weights ({gib(param_bytes)}) exceed {WEIGHT_SHARE:.0%} of the {num_devices} devices' "
                     f"memory ({gib(device_bytes)} each) even fully sharded")


def inference_mesh(param_bytes: int, *, data: int | None = None, fsdp: int | None = None,
                   tensor: int | None = None, devices: Sequence[Any] | None = None):
    """(mesh over every device of every process, MeshChoice) by `choose_mesh`."""
    devices = list(jax.devices() if devices is None else devices)
    local = next((d for d in devices if d.process_index == jax.process_index()), devices[0])
    choice = choose_mesh(param_bytes, len(devices), device_memory(local), data=data, fsdp=fsdp, tensor=tensor)
    return make_mesh(choice.data, choice.fsdp, choice.tensor, devices=devices), choice


def load_on_mesh(path, runtime, *, data: int | None = None, fsdp: int | None = None,
                 tensor: int | None = None):
    """(bundle, mesh, MeshChoice): `path`'s networks restored straight into their shardings on the mesh
    `inference_mesh` picks for their size (checkpoints/pretrained.py)."""
    from dual_diffusion.checkpoints.pretrained import abstract_state, load_pretrained, read_configs, state_bytes

    size = state_bytes([abstract_state(name, cfg, runtime)[1] for name, cfg in read_configs(path).items()])
    mesh, choice = inference_mesh(size, data=data, fsdp=fsdp, tensor=tensor)
    return load_pretrained(path, runtime, mesh=mesh), mesh, choice


def describe_mesh(mesh, choice: MeshChoice) -> dict:
    """The mesh as the commands print it."""
    return {**{k: int(v) for k, v in mesh.shape.items()}, "devices": int(mesh.devices.size),
            "processes": jax.process_count(), "note": choice.note}


def batch_multiple(mesh, rules: Sequence = DEFAULT_RULES) -> int:
    """Rows of a batch are split over this many shards (the `batch` rule's mesh axes); 1 without a mesh."""
    if mesh is None:
        return 1
    spec = logical_to_mesh_spec(("batch",), rules)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def padded_rows(n: int, multiple: int) -> np.ndarray:
    """Source row of each batch row: 0..n-1, then n-1 repeated up to a multiple of `multiple`."""
    if n < 1:
        raise ValueError("an empty batch")
    return np.minimum(np.arange(-(-n // multiple) * multiple), n - 1)


def put_rows(source, rows: np.ndarray, mesh, rules: Sequence = DEFAULT_RULES,
             row_shape: tuple | None = None, dtype=None) -> jax.Array:
    """source[rows] as one batch-sharded global array; this process reads only its own devices' rows.

    source: an array, or anything that `source[index_array]` turns into stacked rows (a lazy reader;
    then give row_shape and dtype). Without a mesh: a plain device array.
    """
    if mesh is None:
        return jnp.asarray(np.asarray(source[rows], dtype))
    if row_shape is None:
        row_shape, dtype = source.shape[1:], source.dtype
    shape = (len(rows), *row_shape)
    loaded: dict = {}

    def load(index):  # rows are split on the batch dimension only: other replicas ask for the same slice
        part = index[0]
        key = (part.start, part.stop)
        if key not in loaded:
            loaded[key] = np.asarray(source[rows[part]], dtype).reshape((-1, *row_shape))
        return loaded[key]

    return jax.make_array_from_callback(shape, batch_sharding(mesh, rules, len(shape)), load)


def put_replicated(value, mesh) -> jax.Array:
    """A host value (the same on every process) on every device of the mesh."""
    value = np.asarray(value)
    if mesh is None:
        return jnp.asarray(value)
    from jax.sharding import NamedSharding, PartitionSpec as P

    return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()), lambda index: value[index])


def fetch(x: jax.Array) -> np.ndarray:
    """The whole array on this host: gathered from every process when it spans several."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_text(text: str) -> str:
    """The main process's `text` on every process (the others' argument is ignored)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode(), np.uint8) if is_main() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = data if is_main() else np.zeros(size, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf)).astype(np.uint8)).decode()
