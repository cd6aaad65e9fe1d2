"""Logical axis names, mesh construction and logical -> mesh sharding rules.

Every parameter is created with logical axis names (one vocabulary for the
whole project); the config's rules map them to the mesh axes `data`, `fsdp`,
`tensor`. Model code never names a mesh axis.

Logical axes:
  batch      examples in a batch              seq       sequence positions
  embed      model width (d_model / hidden)   mlp       feed-forward width
  heads      attention heads x head_dim       kv        per-head width
  vocab      vocabulary                       layers    stacked layers
  conv_in / conv_out   convolution channels   norm      norm scales / small vectors
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: data parallel over batch, parameters sharded over fsdp on
# their width, tensor parallel on heads / mlp / vocab. A rule's value is a mesh
# axis, a tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
)


def slice_index(device) -> int:
    """The TPU slice a device belongs to (multi-slice runs and topologies); 0 for devices without one (CPU, GPU)."""
    return int(getattr(device, "slice_index", 0) or 0)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int, num_slices: int = 1,
               dcn_data: int = -1) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """((data, fsdp, tensor) inside one slice, (dcn_data, 1, 1) across slices), sizes of -1 resolved.

    data / fsdp / tensor describe one slice (one of them may be -1: the slice's remaining devices);
    slices only ever add to the data axis (dcn_data, -1 = all of them), so FSDP and tensor
    parallelism stay on ICI. The mesh's `data` axis is dcn_data x data. Raises ValueError naming the key.
    """
    sizes = [data, fsdp, tensor]
    named = lambda: dict(zip(MESH_AXES, sizes))  # noqa: E731
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {named()}")
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: expected a positive size or -1")
    if dcn_data not in (-1, num_slices):
        raise ValueError(f"mesh.dcn_data={dcn_data}: the devices span {num_slices} slice(s); slices go on the data "
                         f"axis, so expected -1 or {num_slices}")
    if num_devices % num_slices:
        raise ValueError(f"mesh: {num_devices} devices do not split evenly into {num_slices} slices")
    per_slice = num_devices // num_slices
    where = f" per slice ({num_slices} slices)" if num_slices > 1 else ""
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if per_slice % known:
            raise ValueError(f"mesh: {per_slice} devices{where} are not divisible by {named()}")
        sizes[sizes.index(-1)] = per_slice // known
    if int(np.prod(sizes)) != per_slice:
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {per_slice} devices{where} are "
                         f"present ({named()})")
    return (sizes[0], sizes[1], sizes[2]), (num_slices, 1, 1)


# Placements of the frozen weights (config.sharding.frozen_rules):
#   "fsdp"        the same rules as the trainable weights (sharded over fsdp, gathered where used);
#   "replicated"  every frozen weight on every chip: no gathers of them at all, for their whole size in HBM
#                 (T5-XXL in bf16 is 8.9 GiB per chip: fits v5p and v6e beside the stage-2 step, not v4 / v5e).
FROZEN_PLACEMENTS = ("fsdp", "replicated")


def frozen_rules(rules: Sequence[tuple[str, Any]], placement: str = "fsdp") -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules for the frozen weights: `rules` itself, or every axis replicated."""
    if placement not in FROZEN_PLACEMENTS:
        raise ValueError(f"sharding.frozen_rules={placement!r}: expected one of {list(FROZEN_PLACEMENTS)}")
    if placement == "replicated":
        return tuple((name, None) for name, _ in rules)
    return tuple(tuple(r) for r in rules)


def device_grid(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
                dcn_data: int = -1) -> np.ndarray:
    """The (dcn_data x data, fsdp, tensor) array of devices `make_mesh` lays out (see there)."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    slices = num_slices(devices)
    ici, dcn = mesh_shape(data, fsdp, tensor, len(devices), slices, dcn_data)
    if slices > 1:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    try:
        return mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError):  # part of a TPU slice: keep the given order
        return np.asarray(devices).reshape(ici)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None, *,
              dcn_data: int = -1) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), ordered by the hardware.

    One of data/fsdp/tensor may be -1 (the remaining devices). On one slice the device order comes from
    `mesh_utils.create_device_mesh` (the ICI torus on TPU; the given order on CPU). When the devices span
    several TPU slices (`device.slice_index`), the sizes describe one slice and
    `mesh_utils.create_hybrid_device_mesh` puts the slices on the data axis (`dcn_data`: -1 = all of them),
    so FSDP's gathers and tensor parallelism never cross the data-center network.
    """
    return Mesh(device_grid(data, fsdp, tensor, devices, dcn_data=dcn_data), MESH_AXES)


def num_slices(devices: Sequence[Any] | None = None) -> int:
    """How many TPU slices `devices` (default: all) span; 1 off TPU."""
    return len({slice_index(d) for d in (jax.devices() if devices is None else devices)})


def mesh_from_config(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
    """make_mesh from a config's `mesh` group (data, fsdp, tensor, dcn_data)."""
    return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices,
                     dcn_data=mesh_config.get("dcn_data", -1))


def logical_to_mesh_spec(logical: Iterable[str | None] | None, rules: Sequence[tuple[str, Any]]) -> P:
    """Maps one logical PartitionSpec to a mesh PartitionSpec.

    A mesh axis is used at most once per array: a later dimension that would
    reuse one stays replicated. Unknown logical names raise, naming the name.
    """
    if logical is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"sharding rules: no rule for logical axis {name!r}; rules cover {sorted(table)}")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def _logical_spec(leaf) -> tuple | None:
    if isinstance(leaf, nnx.Variable):
        return leaf.get_metadata().get("out_sharding") or leaf.get_metadata().get("sharding")
    return None


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """`spec` with every dimension that its mesh axes do not divide left replicated (padded to len(shape))."""
    fixed = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fixed.append(axes if size > 1 and dim % size == 0 else None)
    return P(*fixed)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for an nnx.State (or any pytree of Variables), from logical names.

    Arrays whose dimension is not divisible by its mesh axes stay replicated
    on that dimension, so tiny test models shard on any mesh.
    """

    def one(leaf):
        spec = logical_to_mesh_spec(_logical_spec(leaf), rules)
        shape = getattr(leaf, "shape", None) or getattr(getattr(leaf, "value", None), "shape", ())
        return NamedSharding(mesh, fit_spec(spec, shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


# --------------------------------------------------------------------------- activations
# Set while a step is traced (training/step.py): the mesh and rules that activation constraints and the
# attention kernel choice read. Outside it (single-device inference, unit tests) constraints are no-ops.
_ACTIVE = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Sequence[tuple[str, Any]]):
    """Within this context, `constrain` pins activations to `mesh` by `rules`, and kernels target its platform."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = None if mesh is None else (mesh, tuple(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def active_mesh_and_rules() -> tuple[Mesh, tuple] | None:
    return getattr(_ACTIVE, "value", None)


def compute_platform() -> str:
    """Platform of the devices the traced computation runs on: the active mesh's, else the default backend's.

    A step compiled for a TPU topology from a CPU host must pick TPU kernels, so the host's backend is
    never consulted while a mesh is active.
    """
    active = active_mesh_and_rules()
    if active is not None:
        return active[0].devices.flat[0].platform
    return jax.default_backend()


def activation_spec(logical: Sequence[str | None], shape: Sequence[int]) -> P | None:
    """The mesh PartitionSpec `constrain` would use for these logical axes and shape (None: no mesh active)."""
    active = active_mesh_and_rules()
    if active is None:
        return None
    mesh, rules = active
    return fit_spec(logical_to_mesh_spec(logical, rules), shape, mesh)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x with its sharding pinned by logical axis names (e.g. ("batch", "seq", None)); identity without a mesh.

    Without these pins XLA propagates the weights' fsdp sharding (on the model width) into the activations
    and every chip computes the whole batch (../shared/TPU.md).
    """
    spec = activation_spec(logical, x.shape)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(active_mesh_and_rules()[0], spec))


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int) -> NamedSharding:
    """Sharding of a batch-major array: the batch dimension over the 'batch' rule."""
    return NamedSharding(mesh, logical_to_mesh_spec(("batch",) + (None,) * (ndim - 1), rules))


# --------------------------------------------------------------------------- weights where they are used
# FSDP keeps each weight sharded over the batch's mesh axes and gathers it where a matmul reads it. Left to
# itself XLA often did otherwise: it kept the weights still and passed activation rows around the ring
# (collective-permutes), about 70 GiB per chip per stage-2 step (README, "Will it fit?"). `read_weight`
# states the gather: the weight, cast to the compute dtype on its own shard, is gathered over the batch's
# axes (tensor-parallel axes stay), so the gather moves the compute dtype. models/layers.matmul reads its
# kernels so and reduce-scatters their float32 gradients straight back to the shards.
_WEIGHT_RULES = threading.local()


@contextlib.contextmanager
def weights_placed_by(rules: Sequence[tuple[str, Any]] | None):
    """Within this context `weight_placement` takes the weights as stored by `rules` (e.g. frozen_rules(...));
    None: by the active activation rules (the trainable weights)."""
    previous = getattr(_WEIGHT_RULES, "value", None)
    _WEIGHT_RULES.value = None if rules is None else tuple(tuple(r) for r in rules)
    try:
        yield
    finally:
        _WEIGHT_RULES.value = previous


def weight_placement(shape: Sequence[int], logical: Sequence[str | None]):
    """(stored, used) NamedShardings of a weight of `shape` (logical axes `logical`): as it is stored, and
    as a matmul reads it (gathered over the mesh axes of the `batch` rule; tensor-parallel axes stay).
    None without an active mesh, or when it is stored whole on those axes (replicated frozen weights)."""
    active = active_mesh_and_rules()
    if active is None:
        return None
    mesh, rules = active
    stored = fit_spec(logical_to_mesh_spec(logical, getattr(_WEIGHT_RULES, "value", None) or rules), shape, mesh)
    batch = dict(rules).get("batch") or ()
    batch = {batch} if isinstance(batch, str) else set(batch)
    keep = lambda axes: tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in batch)  # noqa: E731
    used = P(*[(kept[0] if len(kept) == 1 else kept or None) for kept in map(keep, stored)])
    return None if used == stored else (NamedSharding(mesh, stored), NamedSharding(mesh, used))


def read_weight(w: jax.Array, placement, dtype) -> jax.Array:
    """`w` in `dtype` where a matmul reads it: cast on its own shard, then gathered (weight_placement)."""
    if placement is None:
        return w.astype(dtype)
    stored, used = placement
    return jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(w, stored).astype(dtype), used)
