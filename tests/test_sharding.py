"""Meshes that follow the hardware (sharding.make_mesh / device_grid) and frozen-weight placement rules."""
import dataclasses

import jax
import numpy as np
import pytest

from dual_diffusion import sharding


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh_utils reads of a device when it is not a TPU: its slice, id, platform and kind."""
    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    process_index: int = 0


def _slices(num_slices, per_slice):
    return [FakeDevice(s * per_slice + i, s) for s in range(num_slices) for i in range(per_slice)]


@pytest.mark.parametrize("sizes", [(1, -1, 1), (2, -1, 1), (1, -1, 2)])
def test_fsdp_and_tensor_stay_inside_a_slice(sizes):
    """Devices of 2 slices (listed interleaved, as nothing promises their order): slices go on the data axis
    only, so every fsdp x tensor group, and each slice's share of the data axis, lies in one slice."""
    devices = _slices(2, 8)
    devices = devices[::2] + devices[1::2]
    grid = sharding.device_grid(*sizes, devices=devices)
    data, fsdp, tensor = grid.shape
    assert (data, fsdp * tensor) == (2 * sizes[0], 8 // sizes[0]) and sorted(d.id for d in grid.flat) == list(range(16))
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    for row in slice_of:  # one data index: its fsdp x tensor devices
        assert len(set(row.flat)) == 1
    assert [set(slice_of[i].flat) for i in range(data)] == [{0}] * sizes[0] + [{1}] * sizes[0]


def test_dcn_data_names_the_slices_it_expects():
    with pytest.raises(ValueError, match=r"mesh.dcn_data=3: the devices span 2 slice\(s\).*expected -1 or 2"):
        sharding.device_grid(1, -1, 1, devices=_slices(2, 4), dcn_data=3)
    with pytest.raises(ValueError, match=r"data\*fsdp\*tensor = 8 but 4 devices per slice \(2 slices\)"):
        sharding.device_grid(1, 8, 1, devices=_slices(2, 4))
    assert sharding.device_grid(1, -1, 1, devices=_slices(2, 4), dcn_data=2).shape == (2, 4, 1)


def test_one_slice_of_host_devices_keeps_their_order():
    """On CPU (one slice) the mesh is the given devices in order, as before: callers' meshes do not move."""
    devices = jax.devices()[:8]
    mesh = sharding.make_mesh(2, -1, 2, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in devices]
    assert sharding.num_slices(devices) == 1


def test_frozen_rules_replicate_every_axis_or_follow_the_rules():
    rules = sharding.DEFAULT_RULES
    assert sharding.frozen_rules(rules) == tuple(tuple(r) for r in rules)
    replicated = sharding.frozen_rules(rules, "replicated")
    assert [name for name, _ in replicated] == [name for name, _ in rules]
    assert all(axes is None for _, axes in replicated)
    with pytest.raises(ValueError, match=r"sharding.frozen_rules='tp': expected one of \['fsdp', 'replicated'\]"):
        sharding.frozen_rules(rules, "tp")


def test_matmul_gradients_are_those_of_jnp_dot():
    """layers.matmul only changes the dtype its kernel gradient is accumulated in (float32, so FSDP
    reduces it in float32): in float32 both of its gradients are jnp.dot's."""
    import jax.numpy as jnp

    from dual_diffusion.models.layers import matmul

    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x, k = jax.random.normal(kx, (3, 5, 8)), jax.random.normal(kk, (8, 4))
    g = jax.random.normal(kg, (3, 5, 4))
    ours = jax.vjp(lambda a, b: matmul(a, b, jnp.float32), x, k)
    ref = jax.vjp(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), x, k)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    for a, b in zip(ours[1](g), ref[1](g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # bf16 operands: the kernel's cotangent comes back in the kernel's dtype, from a float32 accumulation
    dk = jax.vjp(lambda b: matmul(x.astype(jnp.bfloat16), b, jnp.bfloat16), k.astype(jnp.bfloat16))[1](
        g.astype(jnp.bfloat16))[0]
    assert dk.dtype == jnp.bfloat16
