"""Random draws keyed per item, so that an item's sample does not depend on its batch.

The samplers take either one key (every row's draws come from it, as before) or one key per
row, shape (B,). With per-row keys, row b draws only from its own key: its noise, tokens and
reveal order are the same whatever else is in the batch, however the batch is split over
devices and hosts, and in whatever batch a resumed evaluation meets it. `item_keys(seed, index)`
gives the pipelines' keys: the seed folded with each item's global index.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def item_keys(seed, indices_B: jax.Array) -> jax.Array:
    """(B,) keys: fold_in(key(seed), index) for each item's global index."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices_B, jnp.uint32))


def per_row(rng: jax.Array) -> bool:
    """True for a (B,) array of keys, False for one key."""
    return jnp.ndim(rng) == 1


def split(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(next, sub) of one key, or of each row's key."""
    if per_row(rng):
        pairs = jax.vmap(jax.random.split)(rng)  # (B, 2)
        return pairs[:, 0], pairs[:, 1]
    nxt, sub = jax.random.split(rng)
    return nxt, sub


def draw(rng: jax.Array, sampler: Callable[[jax.Array, tuple], jax.Array], shape: tuple) -> jax.Array:
    """sampler(key, shape) from one key; with (B,) keys row b of `shape` is sampler(rng[b], shape[1:])."""
    if per_row(rng):
        if rng.shape[0] != shape[0]:
            raise ValueError(f"draw: {rng.shape[0]} row keys for shape {tuple(shape)}")
        return jax.vmap(lambda key: sampler(key, tuple(shape[1:])))(rng)
    return sampler(rng, tuple(shape))
