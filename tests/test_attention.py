"""The attention kernels: splash attention (TPU Pallas, run here in interpret mode) against plain XLA,
padding of lengths that are not a multiple of the block, shard_map over a mesh, and the kernel choice
following the mesh's platform rather than the host's."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dual_diffusion import sharding
from dual_diffusion.models import attention as attn


def _qkv(b, length, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, length, h, d)), jnp.float32) for _ in range(3)]


@pytest.mark.parametrize("length, preferred, expected", [
    (1280, 512, (1280, 256)),  # 512 px: 1024 image + 256 text tokens -> 256-blocks, no padding
    (320, 512, (384, 384)),    # stage 1: 256 + 64 -> padded to 3 lanes
    (1024, 512, (1024, 512)),
    (77, 512, (128, 128)),
])
def test_splash_block_divides_the_padded_length(length, preferred, expected):
    padded, block = attn.splash_block(length, preferred)
    assert (padded, block) == expected
    assert padded % block == 0 and block % attn.LANES == 0 and padded >= length and padded - length < attn.LANES


# 200: padded to 256, the pad masked by segment ids; (72, 200): text queries over cached image + text keys.
@pytest.mark.parametrize("q_len, kv_len", [(128, 128), (200, 200), (72, 200)])
def test_splash_matches_xla_forward(q_len, kv_len):
    q, k, v = _qkv(2, kv_len, 2, 64)
    q = q[:, :q_len]
    scale = 64 ** -0.5
    out = attn.splash_attention(q, k, v, scale=scale, block=128, interpret=True)
    np.testing.assert_allclose(out, attn._xla(q, k, v, None, scale), atol=1e-5)


def test_splash_gradients_match_xla_with_padding():
    q, k, v = _qkv(1, 200, 1, 64)
    scale = 64 ** -0.5
    loss = lambda f: (lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))))
    g_ref = jax.grad(loss(lambda q, k, v: attn._xla(q, k, v, None, scale)), argnums=(0, 1, 2))(q, k, v)
    g = jax.grad(loss(lambda q, k, v: attn.splash_attention(q, k, v, scale=scale, block=128, interpret=True)),
                 argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_splash_under_shard_map_on_a_mesh_matches_xla():
    """Batch over (data, fsdp) and heads over tensor: each device runs the kernel on its shard."""
    mesh = sharding.make_mesh(1, 4, 2)
    q, k, v = _qkv(4, 136, 4, 32, seed=1)
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
        assert sharding.activation_spec(("batch", None, "heads", None), q.shape) == P(("data", "fsdp"), None,
                                                                                      "tensor", None)
        fn = jax.jit(lambda q, k, v: attn.splash_attention(q, k, v, scale=0.3, block=128, interpret=True))
        out = fn(q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
    np.testing.assert_allclose(out, attn._xla(q, k, v, None, 0.3), atol=1e-5)


def test_kernel_choice_follows_the_active_mesh_not_the_host():
    assert jax.default_backend() == "cpu"
    assert attn.resolve_impl("auto", jnp.bfloat16) == "xla"
    assert attn.resolve_impl("auto", jnp.bfloat16, platform="tpu") == "pallas"
    assert attn.resolve_impl("auto", jnp.bfloat16, platform="gpu") == "cudnn"
    assert attn.resolve_impl("auto", jnp.float32, platform="gpu") == "xla"
    with sharding.activation_sharding(sharding.make_mesh(-1, 1, 1), sharding.DEFAULT_RULES):
        assert sharding.compute_platform() == "cpu"
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        devices = topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu", chip_config_name="default",
                                               chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    except Exception as e:  # no libtpu here: the CPU half above still ran
        pytest.skip(f"no TPU topology on this host ({type(e).__name__}); pip install -e '.[tpu]'")
    with sharding.activation_sharding(sharding.make_mesh(-1, 1, 1, devices=devices), sharding.DEFAULT_RULES):
        assert sharding.compute_platform() == "tpu"
        assert attn.resolve_impl("auto", jnp.bfloat16) == "pallas"


def test_constrain_pins_the_batch_and_is_the_identity_without_a_mesh():
    x = jnp.ones((8, 6, 5))
    assert sharding.constrain(x, ("batch", "seq", None)) is x
    mesh = sharding.make_mesh(2, 4, 1)
    with sharding.activation_sharding(mesh, sharding.DEFAULT_RULES):
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", "seq", None)))(x)
        # 6 is not divisible by anything here and 5 never by 8: odd dims stay replicated instead of failing.
        z = jax.jit(lambda a: sharding.constrain(a[:5] * 2, ("batch", "seq", None)))(x)
    assert tuple(y.sharding.spec)[0] == ("data", "fsdp") and not any(tuple(y.sharding.spec)[1:])
    assert z.sharding.is_fully_replicated
    np.testing.assert_array_equal(y, 2 * x)
