"""Image side of D-DiT: rectified flow (REFERENCE.md, Objectives).

Pure functions of arrays, independent of any network. Conventions:
  s in (0, 1) is the noise level (s = 1: pure noise, s = 0: data); the network
  sees timestep 1000 s.
  x_s = (1 - s) x + s e,   e ~ N(0, I)          (`add_noise`)
  v   = dx_s/ds = e - x                          (`velocity_target`)
Latents are channels-last, batch-leading (B, H, W, C); any non-batch shape works.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp


def _bcast(s_B: jax.Array, like: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) to broadcast against `like`."""
    return s_B.reshape(s_B.shape + (1,) * (like.ndim - s_B.ndim))


# --------------------------------------------------------------------------- timesteps
def _logit_normal(rng, batch, mean, std, mode_scale):
    del mode_scale
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))


def _uniform(rng, batch, mean, std, mode_scale):
    del mean, std, mode_scale
    # Open interval: s = 0 would make the x-prediction loss vanish and s = 1 is all noise.
    return jax.random.uniform(rng, (batch,), jnp.float32, minval=1e-5, maxval=1.0 - 1e-5)


def _mode(rng, batch, mean, std, mode_scale):
    """SD3 (Esser et al. 2024, eq. 20): s = 1 - u - c (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).

    Monotone (a valid density) for -1 <= c <= 2 / (pi - 2); c = 1.29 puts more mass mid-way.
    """
    del mean, std
    u = jax.random.uniform(rng, (batch,), jnp.float32, minval=1e-5, maxval=1.0 - 1e-5)
    s = 1.0 - u - mode_scale * (jnp.cos(0.5 * jnp.pi * u) ** 2 - 1.0 + u)
    return jnp.clip(s, 1e-5, 1.0 - 1e-5)


TIMESTEP_SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "logit_normal": _logit_normal,
    "uniform": _uniform,
    "mode": _mode,
}


def sample_timesteps(rng: jax.Array, batch: int, kind: str = "logit_normal", mean: float = 0.0,
                     std: float = 1.0, mode_scale: float = 1.29) -> jax.Array:
    """Noise levels s_B in (0, 1), float32. The release uses logit-normal N(0, 1)."""
    if kind not in TIMESTEP_SAMPLERS:
        raise ValueError(f"sample_timesteps: kind={kind!r}; expected one of {sorted(TIMESTEP_SAMPLERS)}")
    if kind == "mode" and not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
        raise ValueError(f"sample_timesteps: mode_scale={mode_scale} makes the 'mode' density invalid; "
                         f"expected -1 <= mode_scale <= {2.0 / (math.pi - 2.0):.4f}")
    return TIMESTEP_SAMPLERS[kind](rng, batch, mean, std, mode_scale)


# --------------------------------------------------------------------------- noising and targets
def add_noise(latents: jax.Array, noise: jax.Array, s_B: jax.Array) -> jax.Array:
    """x_s = (1 - s) x + s e, in the latents' dtype."""
    if latents.shape != noise.shape or s_B.shape != latents.shape[:1]:
        raise ValueError(f"add_noise: latents {latents.shape}, noise {noise.shape}, s_B {s_B.shape}; "
                         "expected equal latents/noise shapes and s_B of shape (B,)")
    s = _bcast(s_B.astype(jnp.float32), latents)
    return ((1.0 - s) * latents + s * noise).astype(latents.dtype)


def velocity_target(latents: jax.Array, noise: jax.Array) -> jax.Array:
    """v = e - x (constant along the straight path from data to noise)."""
    return noise - latents


def flow_loss(pred_velocity: jax.Array, latents: jax.Array, noise: jax.Array, s_B: jax.Array,
              x_t: jax.Array, form: str = "velocity") -> jax.Array:
    """Per-example flow-matching loss, mean over non-batch dims, float32 (B,).

    form="velocity": |v_pred - (e - x)|^2              (the paper's form)
    form="x_pred":   |(x_t - s v_pred) - x|^2 = s^2 |v_pred - (e - x)|^2  (the release's form)
    """
    v = pred_velocity.astype(jnp.float32)
    x = latents.astype(jnp.float32)
    if form == "velocity":
        err = v - velocity_target(x, noise.astype(jnp.float32))
    elif form == "x_pred":
        s = _bcast(s_B.astype(jnp.float32), x)
        err = (x_t.astype(jnp.float32) - s * v) - x
    else:
        raise ValueError(f"flow_loss: form={form!r}; expected 'velocity' or 'x_pred'")
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


# --------------------------------------------------------------------------- caption dropout (CFG)
def drop_captions(rng: jax.Array, text_ids_or_hidden: jax.Array, null_value: jax.Array,
                  prob: float) -> jax.Array:
    """Replaces whole examples by the null (empty-prompt) value with probability `prob`.

    Works on token ids (B, L) with a null row (L,), or hidden states (B, L, D) with (L, D):
    `null_value` has the shape of one example.
    """
    x = text_ids_or_hidden
    if null_value.shape != x.shape[1:]:
        raise ValueError(f"drop_captions: null_value {null_value.shape} must have the shape of one "
                         f"example {x.shape[1:]} (input {x.shape})")
    drop_B = jax.random.bernoulli(rng, prob, (x.shape[0],))
    return jnp.where(_bcast(drop_B, x), null_value[None].astype(x.dtype), x)


def timestep_for_network(s_B: jax.Array) -> jax.Array:
    """The network's timestep input: 1000 s (REFERENCE.md, Objectives)."""
    return 1000.0 * s_B


__all__ = ["TIMESTEP_SAMPLERS", "sample_timesteps", "add_noise", "velocity_target", "flow_loss",
           "drop_captions", "timestep_for_network"]
