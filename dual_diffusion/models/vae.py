"""SD3's AutoencoderKL (REFERENCE.md, VAE) in Flax NNX: images <-> raw latents.

NHWC activations, HWIO convolution kernels, images in [-1, 1]. The latents
here are the *raw* posterior space: the pipelines apply
(z - cfg.shift_factor) * cfg.scaling_factor themselves. SD3 has no quant
convs, so the encoder's conv_out gives the posterior moments directly and the
decoder's conv_in reads the latents directly.

Parameters stay in Runtime.param_dtype and are cast to Runtime.dtype on use;
GroupNorm statistics are always computed in float32 (bf16 sums over
H*W*C/G elements lose too much). Every parameter carries logical axis names
from dual_diffusion/sharding.py (conv_in / conv_out / norm): the VAE is frozen
and small, so the default rules replicate it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dual_diffusion.models.attention import attention
from dual_diffusion.models.configs import Runtime, VAEConfig
from dual_diffusion.models.layers import Linear, ones, param, zeros

# torch's default Conv2d / Linear init (kaiming_uniform, a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)); only shapes matter once weights are loaded.
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
_EPS = 1e-6  # diffusers' Encoder/Decoder pass resnet_eps=1e-6 to every GroupNorm
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar here


class Conv2d(nnx.Module):
    """2-D convolution, kernel (kh, kw, in, out); padding as lax's ((top, bottom), (left, right))."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, stride: int = 1,
                 padding=None, runtime: Runtime, rngs: nnx.Rngs):
        pdt = runtime.param_dtype
        self.kernel = param(_KERNEL_INIT, rngs, (kernel_size, kernel_size, in_ch, out_ch),
                            (None, None, "conv_in", "conv_out"), pdt)
        self.bias = param(zeros, rngs, (out_ch,), ("conv_out",), pdt)
        half = kernel_size // 2
        self.padding = ((half, half), (half, half)) if padding is None else padding
        self.stride = stride
        self.dtype = jnp.dtype(runtime.dtype)

    def __call__(self, x_BxHxWxC):
        y = jax.lax.conv_general_dilated(
            x_BxHxWxC.astype(self.dtype), self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride), padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm on NHWC: groups of consecutive channels, biased variance, fp32 statistics."""

    def __init__(self, num_groups: int, channels: int, *, runtime: Runtime, rngs: nnx.Rngs):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by norm_num_groups={num_groups}")
        self.scale = param(ones, rngs, (channels,), ("norm",), runtime.param_dtype)
        self.bias = param(zeros, rngs, (channels,), ("norm",), runtime.param_dtype)
        self.num_groups = num_groups
        self.dtype = jnp.dtype(runtime.dtype)

    def __call__(self, x_BxHxWxC):
        b, h, w, c = x_BxHxWxC.shape
        x = x_BxHxWxC.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = x.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((x - mean) * jax.lax.rsqrt(var + _EPS)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResnetBlock(nnx.Module):
    """diffusers ResnetBlock2D without time embedding: x + conv(silu(norm(conv(silu(norm(x))))))."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, *, runtime: Runtime, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(groups, in_ch, runtime=runtime, rngs=rngs)
        self.conv1 = Conv2d(in_ch, out_ch, runtime=runtime, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_ch, runtime=runtime, rngs=rngs)
        self.conv2 = Conv2d(out_ch, out_ch, runtime=runtime, rngs=rngs)
        # A 1x1 projection only where the width changes, as diffusers builds it.
        self.conv_shortcut = (Conv2d(in_ch, out_ch, 1, runtime=runtime, rngs=rngs)
                              if in_ch != out_ch else None)

    def __call__(self, x_BxHxWxC):
        h = self.conv1(jax.nn.silu(self.norm1(x_BxHxWxC)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x_BxHxWxC if self.conv_shortcut is None else self.conv_shortcut(x_BxHxWxC)
        return skip.astype(h.dtype) + h


class MidAttention(nnx.Module):
    """Single-head self-attention over all H*W positions, group norm in front, residual added."""

    def __init__(self, channels: int, groups: int, *, runtime: Runtime, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(groups, channels, runtime=runtime, rngs=rngs)
        # nn.Linear over channels; named like convolution channels so the VAE follows one rule set.
        proj = lambda: Linear(channels, channels, ("conv_in", "conv_out"), dtype=runtime.dtype,
                              param_dtype=runtime.param_dtype, kernel_init=_KERNEL_INIT, rngs=rngs)
        self.to_q, self.to_k, self.to_v, self.to_out = proj(), proj(), proj(), proj()
        self.impl = runtime.attention_impl

    def __call__(self, x_BxHxWxC):
        b, h, w, c = x_BxHxWxC.shape
        x_BxLxC = self.group_norm(x_BxHxWxC).reshape(b, h * w, c)
        heads = lambda t: t.reshape(b, h * w, 1, c)  # one head of width C (diffusers: heads = C // C)
        o = attention(heads(self.to_q(x_BxLxC)), heads(self.to_k(x_BxLxC)), heads(self.to_v(x_BxLxC)),
                      impl=self.impl)
        out = self.to_out(o.reshape(b, h * w, c)).reshape(b, h, w, c)
        return out + x_BxHxWxC.astype(out.dtype)  # rescale_output_factor is 1 in the VAE


class MidBlock(nnx.Module):
    """diffusers UNetMidBlock2D (one attention layer): resnet, [attention], resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, runtime: Runtime, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, runtime=runtime, rngs=rngs)
                                 for _ in range(2)])
        self.attention = (MidAttention(channels, groups, runtime=runtime, rngs=rngs)
                          if add_attention else None)

    def __call__(self, x_BxHxWxC):
        x = self.resnets[0](x_BxHxWxC)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """diffusers DownEncoderBlock2D: resnets, then a stride-2 conv (all but the last block)."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_downsample: bool, *,
                 runtime: Runtime, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, runtime=runtime, rngs=rngs)
                                 for i in range(num_layers)])
        # Downsample2D(padding=0) pads right/bottom by one before a valid stride-2 conv.
        self.downsampler = (Conv2d(out_ch, out_ch, 3, stride=2, padding=((0, 1), (0, 1)), runtime=runtime, rngs=rngs)
                            if add_downsample else None)

    def __call__(self, x_BxHxWxC):
        for resnet in self.resnets:
            x_BxHxWxC = resnet(x_BxHxWxC)
        return x_BxHxWxC if self.downsampler is None else self.downsampler(x_BxHxWxC)


class UpBlock(nnx.Module):
    """diffusers UpDecoderBlock2D: resnets, then nearest x2 and a 3x3 conv (all but the last block)."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, add_upsample: bool, *,
                 runtime: Runtime, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, runtime=runtime, rngs=rngs)
                                 for i in range(num_layers)])
        self.upsampler = Conv2d(out_ch, out_ch, runtime=runtime, rngs=rngs) if add_upsample else None

    def __call__(self, x_BxHxWxC):
        for resnet in self.resnets:
            x_BxHxWxC = resnet(x_BxHxWxC)
        if self.upsampler is None:
            return x_BxHxWxC
        x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        return self.upsampler(x)


class Encoder(nnx.Module):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], runtime=runtime, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < len(ch) - 1, runtime=runtime, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, runtime=runtime, rngs=rngs)
        self.conv_norm_out = GroupNorm(g, ch[-1], runtime=runtime, rngs=rngs)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, runtime=runtime, rngs=rngs)

    def __call__(self, images_BxHxWxC):
        x = self.conv_in(images_BxHxWxC)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime, rngs: nnx.Rngs):
        rev, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], runtime=runtime, rngs=rngs)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention, runtime=runtime, rngs=rngs)
        # The decoder has one resnet more per block than the encoder (diffusers: layers_per_block + 1).
        self.up_blocks = nnx.List([
            UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < len(rev) - 1,
                    runtime=runtime, rngs=rngs)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(g, rev[-1], runtime=runtime, rngs=rngs)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, runtime=runtime, rngs=rngs)

    def __call__(self, latents_BxhxwxC):
        x = self.mid_block(self.conv_in(latents_BxhxwxC))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """SD3's KL autoencoder; latents are raw (no shift/scale), outputs are float32."""

    def __init__(self, cfg: VAEConfig, runtime: Runtime = Runtime(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.runtime = runtime
        self.encoder = Encoder(cfg, runtime, rngs)
        self.decoder = Decoder(cfg, runtime, rngs)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def _check(self, x, channels: int, what: str, spatial_multiple: int) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{what}: expected (B, H, W, {channels}) NHWC input, got shape {x.shape}")
        if x.shape[1] % spatial_multiple or x.shape[2] % spatial_multiple:
            raise ValueError(f"AutoencoderKL.{what}: height and width {x.shape[1:3]} must be multiples of "
                             f"the downsample factor {spatial_multiple}")

    def encode_moments(self, images_BxHxWx3):
        """Posterior (mean, logvar), each (B, H/f, W/f, latent_channels) in float32; logvar clamped as diffusers."""
        self._check(images_BxHxWx3, self.cfg.in_channels, "encode", self.downsample_factor)
        moments = self.encoder(images_BxHxWx3).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def encode(self, images_BxHxWx3):
        """Posterior mean (raw latent space, shift/scale not applied)."""
        return self.encode_moments(images_BxHxWx3)[0]

    def decode(self, latents_BxhxwxC):
        """Raw latents -> images (B, h*f, w*f, out_channels) in roughly [-1, 1], float32, not clipped."""
        self._check(latents_BxhxwxC, self.cfg.latent_channels, "decode", 1)
        return self.decoder(latents_BxhxwxC).astype(jnp.float32)


def sample_posterior(mean, logvar, key):
    """A draw z = mean + exp(logvar / 2) * eps from the diagonal Gaussian posterior."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps
