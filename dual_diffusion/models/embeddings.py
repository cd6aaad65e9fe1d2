"""MM-DiT input embeddings: patch embedding with a cropped 2D sin-cos grid, timestep embedding.

Both follow diffusers' SD3 definitions (PatchEmbed with pos_embed_max_size,
Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) + TimestepEmbedding)
so released checkpoints load unchanged (REFERENCE.md, Network).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dual_diffusion.models.layers import Buffer, Linear, matmul, param, xavier_uniform, zeros


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) [sin | cos] with frequencies 10000^(-2i/dim), computed in float64."""
    if dim % 2:
        raise ValueError(f"sincos_1d: dim={dim} must be even")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_grid(dim: int, grid_size: int, base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
    """The (grid_size**2, dim) float32 grid diffusers' PatchEmbed registers as `pos_embed`.

    Rows run over (row, col) of the grid in row-major order. As in diffusers the
    first half of the channels encodes the column coordinate, the second the row.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d_grid: dim={dim} must be divisible by 4")
    # Coordinates are formed in float32 exactly as the reference does, so the grid matches it.
    coords = (np.arange(grid_size, dtype=np.float32) / np.float32(grid_size / base_size)
              / np.float32(interpolation_scale))
    # The grid is separable: embed each axis once, then tile (same values as embedding every cell).
    emb = sincos_1d(dim // 2, coords).astype(np.float32)  # (G, dim/2)
    grid = np.empty((grid_size, grid_size, dim), np.float32)
    grid[:, :, : dim // 2] = emb[None, :, :]  # first half: column coordinate
    grid[:, :, dim // 2:] = emb[:, None, :]  # second half: row coordinate
    return grid.reshape(grid_size * grid_size, dim)


def timestep_sinusoid(t_B: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """(B,) timesteps (0..1000 scale) -> (B, dim) float32 [cos | sin] (flip_sin_to_cos, shift 0)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t_B.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class PatchEmbed(nnx.Module):
    """NHWC latents -> (B, h*w, hidden) patch tokens plus the center-cropped sin-cos grid.

    proj: the patch x patch, stride patch convolution (kernel HWIO), computed as
    a matmul over non-overlapping patches (exactly the same sums).
    pos_embed: Buffer (1, G*G, hidden), G = pos_embed_max_size, as in checkpoints.
    """

    def __init__(self, *, patch_size: int, in_channels: int, hidden: int, pos_embed_max_size: int,
                 base_size: int, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.patch_size = patch_size
        self.grid_size = pos_embed_max_size
        self.dtype = jnp.dtype(dtype)
        p = patch_size
        # DiT initialises the patch conv like a Linear on flattened patches (xavier over fan_in = p*p*C).
        fan_init = lambda key, shape, dt: xavier_uniform(key, (p * p * in_channels, hidden), dt).reshape(shape)
        self.kernel_axes = (None, None, "conv_in", "embed")
        self.kernel = param(fan_init, rngs, (p, p, in_channels, hidden), self.kernel_axes, param_dtype)
        self.bias = param(zeros, rngs, (hidden,), ("embed",), param_dtype)
        grid = sincos_2d_grid(hidden, pos_embed_max_size, base_size)
        self.pos_embed = Buffer(jnp.asarray(grid)[None], out_sharding=(None, None, "embed"))

    def cropped_pos_embed(self, h: int, w: int) -> jax.Array:
        """(1, h*w, hidden) center crop of the grid for an h x w patch grid."""
        g = self.grid_size
        if h > g or w > g:
            raise ValueError(f"PatchEmbed: patch grid {h}x{w} exceeds pos_embed_max_size={g}")
        top, left = (g - h) // 2, (g - w) // 2
        grid = self.pos_embed[...].reshape(1, g, g, -1)[:, top:top + h, left:left + w, :]
        return grid.reshape(1, h * w, -1)

    def __call__(self, latents_BxHxWxC: jax.Array) -> jax.Array:
        b, hh, ww, c = latents_BxHxWxC.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"PatchEmbed: latent size {hh}x{ww} is not divisible by patch_size={p}")
        h, w = hh // p, ww // p
        patches = latents_BxHxWxC.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, h * w, p * p * c).astype(self.dtype)
        kernel = self.kernel[...]
        tokens = matmul([patches], kernel, self.kernel_axes, self.dtype, jnp.float32,
                        shape=(p * p * c, kernel.shape[-1]))[0] + self.bias[...]
        return tokens + self.cropped_pos_embed(h, w).astype(jnp.float32)


class TimestepEmbedder(nnx.Module):
    """(B,) timesteps -> (B, hidden): 256-channel sinusoid -> linear_1 -> SiLU -> linear_2."""

    def __init__(self, hidden: int, *, freq_dim: int = 256, dtype="float32", param_dtype="float32",
                 rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        normal = nnx.initializers.normal(0.02)  # DiT's timestep MLP init
        self.linear_1 = Linear(freq_dim, hidden, (None, "embed"), dtype=dtype, param_dtype=param_dtype,
                               kernel_init=normal, rngs=rngs)
        self.linear_2 = Linear(hidden, hidden, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                               kernel_init=normal, rngs=rngs)

    def __call__(self, t_B: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(timestep_sinusoid(t_B, self.freq_dim))))
