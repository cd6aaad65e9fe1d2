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
    reduces it in float32): in float32 both of its gradients are jnp.dot's, for several inputs at once and
    a kernel read in another shape (PatchEmbed's)."""
    import jax.numpy as jnp

    from dual_diffusion.models.layers import matmul

    kx, ky, kk, kg = jax.random.split(jax.random.key(0), 4)
    x, y = jax.random.normal(kx, (3, 5, 8)), jax.random.normal(ky, (2, 8))
    w = jax.random.normal(kk, (2, 4, 4))  # read as an (8, 4) kernel
    gx, gy = jax.random.normal(kg, (3, 5, 4)), jnp.ones((2, 4))

    def ours(a, b, k):
        return matmul([a, b], k, (None, None, None), jnp.float32, jnp.float32, shape=(8, 4))

    def ref(a, b, k):
        return tuple(jnp.dot(v, k.reshape(8, 4), preferred_element_type=jnp.float32) for v in (a, b))

    (o, o_vjp), (r, r_vjp) = jax.vjp(ours, x, y, w), jax.vjp(ref, x, y, w)
    for a, b in zip(o + o_vjp((gx, gy)), r + r_vjp((gx, gy))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # a bf16 read of a float32 weight: its cotangent comes back in float32, from a float32 accumulation
    dw = jax.vjp(lambda k: matmul([x], k, (None, None, None), jnp.bfloat16, jnp.bfloat16, shape=(8, 4))[0],
                 w)[1](gx.astype(jnp.bfloat16))[0]
    assert dw.dtype == jnp.float32 and dw.shape == w.shape
