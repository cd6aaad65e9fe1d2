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


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size}: expected a positive size or -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but {len(devices)} devices are present "
                         f"({dict(zip(MESH_AXES, sizes))})")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


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
