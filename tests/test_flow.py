"""Rectified flow: timesteps, noising, targets, loss, caption dropout."""
import dual_diffusion  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dual_diffusion.diffusion.flow import add_noise, drop_captions, flow_loss, sample_timesteps, velocity_target


def _data(seed=0, shape=(4, 8, 8, 3)):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape), jax.random.uniform(k3, shape[:1])


def test_noising_endpoints_and_velocity_is_derivative():
    x, e, s = _data()
    np.testing.assert_allclose(add_noise(x, e, jnp.zeros(4)), x)
    np.testing.assert_allclose(add_noise(x, e, jnp.ones(4)), e)
    # d x_s / ds = e - x (the path is a straight line).
    _, tangent = jax.jvp(lambda s_: add_noise(x, e, s_), (s,), (jnp.ones(4),))
    np.testing.assert_allclose(tangent, velocity_target(x, e), atol=1e-6)
    with pytest.raises(ValueError, match="s_B"):
        add_noise(x, e, jnp.zeros(3))


@pytest.mark.parametrize("form", ["velocity", "x_pred"])
def test_flow_loss_of_exact_velocity_is_zero(form):
    x, e, s = _data(1)
    xt = add_noise(x, e, s)
    loss = flow_loss(velocity_target(x, e), x, e, s, xt, form=form)
    assert loss.shape == (4,)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)


def test_x_pred_form_is_s2_weighted_velocity_loss():
    x, e, s = _data(2)
    xt = add_noise(x, e, s)
    v = jax.random.normal(jax.random.key(9), x.shape)
    lv = flow_loss(v, x, e, s, xt, form="velocity")
    lx = flow_loss(v, x, e, s, xt, form="x_pred")
    np.testing.assert_allclose(lx, s ** 2 * lv, rtol=1e-4)
    np.testing.assert_allclose(lv, jnp.mean((v - (e - x)) ** 2, axis=(1, 2, 3)), rtol=1e-6)
    with pytest.raises(ValueError, match="form='eps'"):
        flow_loss(v, x, e, s, xt, form="eps")


def test_timestep_distributions():
    n = 20000
    key = jax.random.key(3)
    for kind in ("logit_normal", "uniform", "mode"):
        s = np.asarray(sample_timesteps(key, n, kind))
        assert s.shape == (n,) and s.min() > 0 and s.max() < 1, kind
    # logit-normal: logit(s) ~ N(mean, std); 5-sigma bounds on the sample mean and std.
    s = np.asarray(sample_timesteps(key, n, "logit_normal", mean=0.5, std=0.8), np.float64)
    z = np.log(s / (1 - s))
    assert abs(z.mean() - 0.5) < 5 * 0.8 / np.sqrt(n)
    assert abs(z.std() - 0.8) < 5 * 0.8 / np.sqrt(2 * n)
    # uniform: mean 1/2, variance 1/12.
    u = np.asarray(sample_timesteps(key, n, "uniform"))
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    # "mode" with scale 0 is uniform; with 1.29 it concentrates mid-way (less mass in the tails).
    m0 = np.asarray(sample_timesteps(key, n, "mode", mode_scale=0.0))
    assert abs(m0.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    m = np.asarray(sample_timesteps(key, n, "mode", mode_scale=1.29))
    assert np.mean((m > 0.25) & (m < 0.75)) > 0.6
    with pytest.raises(ValueError, match="kind='cosine'"):
        sample_timesteps(key, 2, "cosine")


def test_drop_captions_ids_and_hidden():
    B, L, D = 4000, 5, 3
    ids = jnp.arange(B * L, dtype=jnp.int32).reshape(B, L) + 10
    null_ids = jnp.zeros((L,), jnp.int32)
    out = np.asarray(drop_captions(jax.random.key(0), ids, null_ids, 0.1))
    dropped = (out == 0).all(1)
    kept = (out == np.asarray(ids)).all(1)
    assert np.all(dropped | kept), "an example was partly replaced"
    assert abs(dropped.mean() - 0.1) < 5 * np.sqrt(0.09 / B)
    hidden = jax.random.normal(jax.random.key(1), (8, L, D)).astype(jnp.bfloat16)
    null_h = jnp.ones((L, D))
    np.testing.assert_array_equal(drop_captions(jax.random.key(2), hidden, null_h, 0.0), hidden)
    all_null = drop_captions(jax.random.key(2), hidden, null_h, 1.0)
    assert all_null.dtype == jnp.bfloat16
    np.testing.assert_array_equal(all_null, jnp.ones((8, L, D)))
    with pytest.raises(ValueError, match="null_value"):
        drop_captions(jax.random.key(2), hidden, jnp.ones((L,)), 0.1)
