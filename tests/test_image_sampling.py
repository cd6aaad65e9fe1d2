"""Flow-ODE samplers against oracle velocity fields with known answers."""
import functools

import dual_diffusion  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dual_diffusion.diffusion.image_sampling import resolution_shift, sample_images, time_grid

MU, SIG = 0.7, 0.5


def gaussian_velocity(x, cond, timestep, mu=MU, sig=SIG):
    """Exact v(x, s) = E[e - x0 | x_s] for data x0 ~ N(mu, sig^2) per pixel, e ~ N(0, 1).

    The ODE maps noise z at s = 1 to mu + sig z at s = 0 (x_s = (1-s) mu + sqrt(var_s) z).
    `cond` (if given) shifts the data mean, so guidance can be checked.
    """
    s = (timestep / 1000.0).reshape((-1,) + (1,) * (x.ndim - 1))
    mu = mu + (0.0 if cond is None else cond.reshape(s.shape))
    var = (1 - s) ** 2 * sig ** 2 + s ** 2
    return (s - (1 - s) * sig ** 2) / var * (x - (1 - s) * mu) - mu


NOISE = jax.random.normal(jax.random.key(0), (4, 4, 4, 2))
EXACT = MU + SIG * NOISE


def _err(steps, method, shift):
    x = sample_images(gaussian_velocity, NOISE, None, steps=steps, method=method, shift=shift, cfg_scale=1.0)
    return float(jnp.max(jnp.abs(x - EXACT)))


def test_time_grid_and_shifts():
    g = np.asarray(time_grid(28, 3.0, "linspace"))
    assert g.shape == (29,) and g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0)
    lin = np.linspace(1, 0, 29)
    np.testing.assert_allclose(g, 3 * lin / (1 + 2 * lin), atol=1e-6)
    np.testing.assert_allclose(time_grid(10, 1.0, "linspace"), np.linspace(1, 0, 11), atol=1e-7)
    with pytest.raises(ValueError, match="kind='karras'"):
        time_grid(10, 3.0, "karras")


@pytest.mark.parametrize("steps", [28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_default_grid_is_diffusers_flow_match_euler(steps, shift):
    """The release samples with diffusers' scheduler (default num_train_timesteps=1000): same levels."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    want = scheduler.sigmas.numpy()
    got = np.asarray(time_grid(steps, shift))
    assert got.dtype == np.float32 and got.shape == want.shape == (steps + 1,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The network sees timestep = 1000 s, the scheduler's own timesteps.
    np.testing.assert_allclose(1000.0 * got[:-1], scheduler.timesteps.numpy(), rtol=0, atol=1e-3)
    if steps == 28 and shift == 3.0:  # the figures REFERENCE.md's errata quote
        np.testing.assert_allclose(got[-4:], [0.200, 0.111, 0.009, 0.0], atol=5e-4)


def test_sample_images_follows_the_grid():
    """Euler on the default grid is Euler on diffusers' levels; "linspace" is the other grid."""
    velocity = lambda x, cond, t: jnp.broadcast_to((t / 1000.0).reshape(-1, 1, 1, 1), x.shape)  # noqa: E731
    # With v = s, one Euler step from s to s' adds (s' - s) s: the sum records the grid.
    for kind in ("diffusers", "linspace"):
        g = np.asarray(time_grid(5, 3.0, kind), np.float64)
        x = sample_images(velocity, jnp.zeros((1, 1, 1, 1)), None, steps=5, cfg_scale=1.0, grid=kind)
        np.testing.assert_allclose(float(x[0, 0, 0, 0]), np.sum(np.diff(g) * g[:-1]), rtol=1e-5)
    default = sample_images(velocity, jnp.zeros((1, 1, 1, 1)), None, steps=5, cfg_scale=1.0)
    explicit = sample_images(velocity, jnp.zeros((1, 1, 1, 1)), None, steps=5, cfg_scale=1.0,
                             grid=time_grid(5, 3.0, "diffusers"))
    assert float(default[0, 0, 0, 0]) == float(explicit[0, 0, 0, 0])
    assert resolution_shift(256) == pytest.approx(np.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(np.exp(1.15))
    assert resolution_shift(1024) > resolution_shift(256)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_first_order(shift):
    e16, e32 = _err(16, "euler", shift), _err(32, "euler", shift)
    assert 1.7 < e16 / e32 < 2.3, (e16, e32)


def test_heun_second_order():
    e32, e64 = _err(32, "heun", 1.0), _err(64, "heun", 1.0)
    assert 3.4 < e32 / e64 < 4.6, (e32, e64)  # error shrinks ~4x when steps double
    e32s, e64s = _err(32, "heun", 3.0), _err(64, "heun", 3.0)
    assert e32s / e64s > 3.4 and e64s < 5e-4, (e32s, e64s)
    assert _err(28, "heun", 3.0) < _err(28, "euler", 3.0) / 20


def test_point_mass_is_exact_with_one_euler_step():
    """Data = a point: the velocity is constant along straight paths, Euler is exact."""
    v = functools.partial(gaussian_velocity, sig=0.0)
    x = sample_images(v, NOISE, None, steps=1, cfg_scale=1.0)
    np.testing.assert_allclose(x, jnp.full_like(NOISE, MU), atol=1e-5)


def test_cfg_one_batched_call_and_negative_prompt():
    B = NOISE.shape[0]
    cond, uncond, neg = jnp.full((B,), 0.5), jnp.zeros((B,)), jnp.full((B,), -0.3)
    seen = []

    def v(x, c, t):
        seen.append(x.shape[0])
        return gaussian_velocity(x, c, t)

    w = 4.0
    out = sample_images(v, NOISE, cond, uncond, steps=12, cfg_scale=w)
    assert seen == [2 * B], "one traced call per step on the [cond; uncond] batch"

    # CFG = Euler on the combined field v_u + w (v_c - v_u).
    def combined(u):
        return lambda x, c, t: gaussian_velocity(x, u, t) + w * (gaussian_velocity(x, cond, t) -
                                                                 gaussian_velocity(x, u, t))

    ref = sample_images(combined(uncond), NOISE, None, steps=12, cfg_scale=1.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    out_neg = sample_images(gaussian_velocity, NOISE, cond, neg, steps=12, cfg_scale=w)
    np.testing.assert_allclose(out_neg, sample_images(combined(neg), NOISE, None, steps=12, cfg_scale=1.0),
                               atol=1e-5)
    # Without uncond (or with scale 1) there is no guidance and no doubled batch.
    seen.clear()
    sample_images(v, NOISE, cond, None, steps=3)
    assert seen == [B]


@pytest.mark.parametrize("fresh_noise", [False, True])
def test_inpainting_keeps_known_region(fresh_noise):
    known = jax.random.normal(jax.random.key(5), NOISE.shape) + 3.0
    mask = (jnp.arange(4)[None, :, None, None] < 2) & jnp.ones(NOISE.shape, bool)  # top half known
    rng = jax.random.key(7) if fresh_noise else None
    out = sample_images(gaussian_velocity, NOISE, None, steps=16, cfg_scale=1.0, inpaint_mask=mask,
                        known_latents=known, rng=rng)
    free = sample_images(gaussian_velocity, NOISE, None, steps=16, cfg_scale=1.0)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(out)[m], np.asarray(known)[m], atol=1e-6)
    # This oracle is per-pixel, so the unknown region is generated exactly as without in-painting.
    np.testing.assert_allclose(np.asarray(out)[~m], np.asarray(free)[~m], atol=1e-6)


def test_jit_sharded_batch_and_stats():
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("data",))
    noise = jax.random.normal(jax.random.key(1), (8, 4, 4, 2))
    cond = jnp.linspace(-1, 1, 8)
    sharded = jax.device_put(noise, NamedSharding(mesh, P("data")))
    cond_sh = jax.device_put(cond, NamedSharding(mesh, P("data")))

    @functools.partial(jax.jit, static_argnames="method")
    def run(noise, cond, method):
        return sample_images(gaussian_velocity, noise, cond, jnp.zeros_like(cond), steps=6, method=method,
                             cfg_scale=2.0, return_stats=True)

    for method, nfe in (("euler", 6), ("heun", 12)):
        out, stats = run(sharded, cond_sh, method)
        ref, _ = run(noise, cond, method)
        assert stats["nfe"] == nfe
        np.testing.assert_allclose(out, ref, atol=1e-6)
    with pytest.raises(ValueError, match="method='rk4'"):
        sample_images(gaussian_velocity, noise, None, method="rk4")
