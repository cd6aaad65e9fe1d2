"""Image sampling: integrate the rectified-flow ODE dx/ds = v(x, s) from s = 1 (noise) to 0.

REFERENCE.md, Inference (and Errata): Euler, 28 steps, SD3 shift 3.0, CFG 7.0 against
the empty prompt, on the noise levels of diffusers' FlowMatchEulerDiscreteScheduler.
Everything here is traceable: the step loop is one `lax.fori_loop`, so the caller jits
the whole sampler once, e.g.

    @jax.jit
    def generate(state, noise, cond, uncond):
        fn = lambda x, c, t: model_velocity(state, x, c, t)   # closes over traced params
        return sample_images(fn, noise, cond, uncond, steps=28)

(jitting a closure over concrete parameters would bake them in as constants).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

VelocityFn = Callable[[jax.Array, Any, jax.Array], jax.Array]


def shift_times(s, shift: float):
    """SD3 time shift s' = shift s / (1 + (shift - 1) s): more steps at high noise."""
    return shift * s / (1.0 + (shift - 1.0) * s)


GRIDS = ("diffusers", "linspace")


def time_grid(steps: int, shift: float = 3.0, kind: str = "diffusers",
              num_train_timesteps: int = 1000) -> jax.Array:
    """Noise levels s_0 = 1 > s_1 > ... > s_steps = 0, float32 (steps + 1,).

    kind="diffusers" (default; the release's sampler): the levels of diffusers'
      `FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`. The scheduler's
      lowest level is its training grid's last one, 1/num_train_timesteps, already
      shifted; inference spaces `steps` levels evenly from 1 down to it, shifts them
      (a second time for that end point), and appends 0. With shift 3 and 28 steps the
      last levels are 0.200, 0.111, 0.009, 0: one step at almost no noise.
    kind="linspace": shift(linspace(1, 0, steps + 1)) (last levels 0.265, 0.188, 0.100, 0
      for 28 steps at shift 3): the noise-free end point is on the grid itself.
    """
    if steps < 1:
        raise ValueError(f"time_grid: steps={steps}; expected >= 1")
    if shift <= 0:
        raise ValueError(f"time_grid: shift={shift}; expected > 0")
    if kind == "linspace":
        return shift_times(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)
    if kind != "diffusers":
        raise ValueError(f"time_grid: kind={kind!r}; expected one of {GRIDS}")
    # float64 on the host, then float32 like the scheduler's sigmas.
    lowest = shift_times(1.0 / num_train_timesteps, shift)
    levels = shift_times(np.linspace(1.0, lowest, steps, dtype=np.float64), shift)
    return jnp.asarray(np.append(levels, 0.0), jnp.float32)


def resolution_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift: log(shift) linear in the number of image tokens.

    Bigger images keep more signal at a given noise level, so they need more steps at
    high noise (Esser et al. 2024, sec. 5.3.2). With the defaults 256 tokens (256 px,
    patch 2) give e^0.5 = 1.65 and 4096 tokens (1024 px) e^1.15 = 3.16.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return math.exp(base_shift + slope * (image_seq_len - base_seq_len))


def _guided_velocity(velocity_fn: VelocityFn, cond, uncond, cfg_scale: float):
    """v(x, s) with classifier-free guidance: one network call on [cond; uncond]."""
    guided = uncond is not None and cfg_scale != 1.0
    if guided:
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

    def velocity(x, s):
        B = x.shape[0]
        if not guided:
            return velocity_fn(x, cond, jnp.full((B,), 1000.0 * s, jnp.float32)).astype(jnp.float32)
        x2 = jnp.concatenate([x, x], axis=0)
        v = velocity_fn(x2, both, jnp.full((2 * B,), 1000.0 * s, jnp.float32)).astype(jnp.float32)
        v_cond, v_uncond = v[:B], v[B:]
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return velocity


def _euler(velocity, x, s, s_next):
    return x + (s_next - s) * velocity(x, s)


def _heun(velocity, x, s, s_next):
    # Trapezoidal corrector; the flow velocity is finite at s = 0, so the last step is Heun too.
    v1 = velocity(x, s)
    x_pred = x + (s_next - s) * v1
    v2 = velocity(x_pred, s_next)
    return x + (s_next - s) * 0.5 * (v1 + v2)


STEPPERS = {"euler": (_euler, 1), "heun": (_heun, 2)}


def sample_images(velocity_fn: VelocityFn, noise_BxHxWxC: jax.Array, cond: Any, uncond: Any = None, *,
                  steps: int = 28, method: str = "euler", shift: float = 3.0, cfg_scale: float = 7.0,
                  inpaint_mask: jax.Array | None = None, known_latents: jax.Array | None = None,
                  rng: jax.Array | None = None, grid: str | jax.Array = "diffusers",
                  return_stats: bool = False):
    """Latents (float32, shape of the noise) from noise by the flow ODE.

    velocity_fn(x_BxHxWxC, cond_batch, timestep_B) -> v, timestep = 1000 s.
    cond / uncond: pytrees of batch-leading arrays (e.g. T5 hidden states). With
      uncond given and cfg_scale != 1 each step makes ONE call on the 2B batch
      [cond; uncond] and uses v_u + cfg (v_c - v_u); a negative prompt is just a
      different uncond.
    method: "euler" (1 call per step) or "heun" (2 calls per step, second order).
    grid: a `time_grid` kind ("diffusers", the release's scheduler, or "linspace"),
      or explicit noise levels (steps + 1,) from 1 to 0. `shift` applies to the
      kinds (pass `shift=resolution_shift(...)` for the resolution-dependent variant).
    In-painting (no retraining): `inpaint_mask` (broadcastable to the latents,
      True = known) and `known_latents`. After every step the known region is reset
      to its point on the noising path, (1 - s) known + s e, with e the initial noise
      (or fresh noise per step when `rng` is given); the rest is generated around it.
    return_stats: also return {"nfe": network calls}.
    """
    if method not in STEPPERS:
        raise ValueError(f"sample_images: method={method!r}; expected one of {sorted(STEPPERS)}")
    if (inpaint_mask is None) != (known_latents is None):
        raise ValueError("sample_images: inpaint_mask and known_latents go together")
    if known_latents is not None and known_latents.shape != noise_BxHxWxC.shape:
        raise ValueError(f"sample_images: known_latents {known_latents.shape} != noise {noise_BxHxWxC.shape}")
    sigmas = time_grid(steps, shift, grid) if isinstance(grid, str) else jnp.asarray(grid, jnp.float32)
    if sigmas.shape != (steps + 1,):
        raise ValueError(f"sample_images: grid {sigmas.shape}; expected ({steps + 1},)")
    step_fn, calls_per_step = STEPPERS[method]
    velocity = _guided_velocity(velocity_fn, cond, uncond, cfg_scale)
    noise = noise_BxHxWxC.astype(jnp.float32)

    def keep_known(x, s, i):
        if inpaint_mask is None:
            return x
        e = noise if rng is None else jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        on_path = (1.0 - s) * known_latents.astype(jnp.float32) + s * e
        return jnp.where(jnp.asarray(inpaint_mask, bool), on_path, x)

    def body(i, x):
        s, s_next = sigmas[i], sigmas[i + 1]
        return keep_known(step_fn(velocity, x, s, s_next), s_next, i)

    # At s = 1 the noising path is pure noise, so the start needs no reset.
    x = jax.lax.fori_loop(0, steps, body, noise)
    if return_stats:
        return x, {"nfe": steps * calls_per_step}
    return x


__all__ = ["shift_times", "time_grid", "GRIDS", "resolution_shift", "sample_images", "STEPPERS"]
