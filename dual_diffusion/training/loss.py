"""The dual loss (REFERENCE.md, Objectives): L = L_image + lambda L_text.

A pure function of a batch and three network callables, so it can be read and
tested without any real network:
  encode_text(ids_BxL) -> hidden_BxLxD          (frozen T5, except the mask row)
  encode_image(images_NHWC) -> latents_NHWC     (frozen VAE: (mean - shift) * scale, or pixels)
  denoise(latents, hidden, timestep_B) -> (velocity, logits)   (the MM-DiT)
  encode_posterior(images_NHWC) -> (mean, std)  (optional, VAE only: the posterior in latent units)

Latents: with latent_sampling "sample" (the release) and a posterior, each image's
latent is a posterior draw mean + std * noise, the noise drawn by `corrupt` from the
step's RNG; "mean" (or pixel space) uses the posterior mean.

Image half (t2i pairs): x_s = (1 - s) x + s e with s logit-normal; T5 sees the
clean caption, replaced by the empty prompt with probability caption_dropout.
Text half (i2t pairs): the image is clean (timestep 0); T5 sees the masked ids
(antithetic t, never masking `fixed_mask` positions); the loss counts
`label_mask` positions (in stage 3 the answer and its EOS padding: the data sets
the mask), normalised per example or over all B x L tokens (`text_normalization`).
With `fused`, both halves go through T5 and the MM-DiT as one batch of 2B.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from dual_diffusion.diffusion import flow, masked
from dual_diffusion.sharding import constrain


LATENT_SAMPLING = ("sample", "mean")
# The posterior noise is folded in as its own stream (not one more `split`), so adding it left every
# other draw of a step unchanged; the constant only has to differ from small split counts.
_LATENT_NOISE_STREAM = 0x1A7E


@dataclasses.dataclass(frozen=True)
class LossConfig:
    mask_id: int
    null_id: int  # the empty prompt: every position EOS (the pipeline pads captions with EOS)
    lambda_text: float = 0.2
    image_form: str = "x_pred"  # "x_pred" (release) or "velocity" (paper)
    timestep_kind: str = "logit_normal"
    timestep_mean: float = 0.0
    timestep_std: float = 1.0
    caption_dropout: float = 0.1
    text_schedule: str = "loglinear"
    text_eps: float = 1e-3
    fused: bool = True
    # "per_example": each row's loss / its label count; "batch_tokens": summed loss / (B x L), the
    # release's rule. They agree when every position is labelled (captions in stages 1-2).
    text_normalization: str = "per_example"
    latent_sampling: str = "sample"  # "sample" (release: a VAE posterior draw) | "mean"

    def __post_init__(self):
        if self.text_normalization not in masked.NORMALIZATIONS:
            raise ValueError(f"loss.text_normalization={self.text_normalization!r}; expected one of "
                             f"{list(masked.NORMALIZATIONS)}")
        if self.latent_sampling not in LATENT_SAMPLING:
            raise ValueError(f"loss.latent_sampling={self.latent_sampling!r}; expected one of {list(LATENT_SAMPLING)}")

    @classmethod
    def from_config(cls, loss_cfg, mask_id: int, null_id: int) -> "LossConfig":
        fields = {f.name for f in dataclasses.fields(cls)} - {"mask_id", "null_id"}
        return cls(mask_id=mask_id, null_id=null_id, **{k: v for k, v in loss_cfg.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Networks:
    encode_text: Callable
    encode_image: Callable
    denoise: Callable
    encode_posterior: Callable | None = None
    # T5 for the text-to-image captions; a stop-gradient copy when only the mask row trains (captions hold
    # no mask token, so their gradient is exactly zero and the backward through T5 is skipped for them).
    encode_caption: Callable | None = None
    # (caption_ids, noisy_ids) -> (caption hidden, text hidden) in one pass over T5's layers (each layer's
    # weights read once for both), captions as encode_caption treats them; used instead of the two above.
    encode_texts: Callable | None = None


def corrupt(batch: dict, rng: jax.Array, cfg: LossConfig, latent_shape: tuple) -> dict:
    """All randomness of a step, drawn for the global batch (so microbatching changes nothing).

    Returns {s_B, noise (B, *latent_shape), caption_ids, t_B, noisy_ids}, plus with
    latent_sampling "sample" the posterior noise {latent_noise_t2i, latent_noise_i2t}
    (B, *latent_shape) each (per half, so microbatch slices keep pairs together).
    """
    t2i, i2t = batch["t2i"], batch["i2t"]
    rng_s, rng_noise, rng_drop, rng_t, rng_mask = jax.random.split(rng, 5)
    B = t2i["text_ids"].shape[0]
    if i2t["text_ids"].shape[0] != B:
        raise ValueError(f"dual_loss: t2i batch {B} != i2t batch {i2t['text_ids'].shape[0]}; the halves must match")
    null_L = jnp.full(t2i["text_ids"].shape[1:], cfg.null_id, t2i["text_ids"].dtype)
    t_B = masked.antithetic_times(rng_t, B, cfg.text_eps)
    drawn = dict(
        s_B=flow.sample_timesteps(rng_s, B, cfg.timestep_kind, cfg.timestep_mean, cfg.timestep_std),
        noise=jax.random.normal(rng_noise, (B,) + tuple(latent_shape), jnp.float32),
        caption_ids=flow.drop_captions(rng_drop, t2i["text_ids"], null_L, cfg.caption_dropout),
        t_B=t_B,
        noisy_ids=masked.mask_tokens(rng_mask, i2t["text_ids"], t_B, cfg.mask_id,
                                     masked.Schedule(cfg.text_schedule, cfg.text_eps), ~i2t["fixed_mask"]),
    )
    if cfg.latent_sampling == "sample":
        both = jax.random.normal(jax.random.fold_in(rng, _LATENT_NOISE_STREAM), (2, B) + tuple(latent_shape),
                                 jnp.float32)
        drawn.update(latent_noise_t2i=both[0], latent_noise_i2t=both[1])
    return drawn


def per_example_losses(nets: Networks, batch: dict, noised: dict, cfg: LossConfig) -> tuple[jax.Array, jax.Array]:
    """(loss_image_B, loss_text_B) float32 for a (micro)batch and its slice of `corrupt`'s draws."""
    t2i, i2t = batch["t2i"], batch["i2t"]
    B = t2i["text_ids"].shape[0]
    x0, clean = encode_image_halves(nets, t2i["image"], i2t["image"], cfg.fused,
                                    (noised.get("latent_noise_t2i"), noised.get("latent_noise_i2t")))
    s_B, noise = noised["s_B"], noised["noise"].astype(x0.dtype)
    x_s = flow.add_noise(x0, noise, s_B)
    timesteps = (flow.timestep_for_network(s_B), jnp.zeros((B,), jnp.float32))
    if nets.encode_texts is not None:
        caption_hidden, text_hidden = nets.encode_texts(noised["caption_ids"], noised["noisy_ids"])
    else:
        caption_hidden = (nets.encode_caption or nets.encode_text)(noised["caption_ids"])
        text_hidden = nets.encode_text(noised["noisy_ids"])
    if cfg.fused:
        velocity, logits = nets.denoise(interleave(x_s, clean), interleave(caption_hidden, text_hidden),
                                        interleave(*timesteps), image_rows=lambda x: half(x, 0),
                                        text_rows=lambda x: half(x, 1))
    else:
        velocity, _ = nets.denoise(x_s, caption_hidden, timesteps[0])
        _, logits = nets.denoise(clean, text_hidden, timesteps[1])
    loss_image_B = flow.flow_loss(velocity, x0, noise, s_B, x_s, form=cfg.image_form)
    loss_text_B = masked.masked_diffusion_loss(
        logits, i2t["text_ids"], noised["noisy_ids"], noised["t_B"], cfg.mask_id,
        masked.Schedule(cfg.text_schedule, cfg.text_eps), label_mask_BxL=i2t["label_mask"],
        normalization=cfg.text_normalization)
    return loss_image_B, loss_text_B


def combine(loss_image: jax.Array, loss_text: jax.Array, cfg: LossConfig) -> dict:
    loss = loss_image + cfg.lambda_text * loss_text
    return {"loss": loss, "loss_image": loss_image, "loss_text": loss_text}


def dual_loss(nets: Networks, batch: dict, rng: jax.Array, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """Scalar loss and float32 metrics {loss, loss_image, loss_text} for one batch."""
    shape = latent_shape(nets, batch["t2i"]["image"])
    li, lt = per_example_losses(nets, batch, corrupt(batch, rng, cfg, shape), cfg)
    metrics = combine(jnp.mean(li), jnp.mean(lt), cfg)
    return metrics["loss"], metrics


def latent_shape(nets: Networks, images_NHWC) -> tuple:
    """Per-example latent shape, without running the encoder."""
    one = jax.ShapeDtypeStruct((1,) + images_NHWC.shape[1:], images_NHWC.dtype)
    return tuple(jax.eval_shape(nets.encode_image, one).shape[1:])


def encode_image(nets: Networks, images_NHWC, noise=None):
    """Latents (N, *latent_shape): the posterior mean, or mean + std * noise when `noise` is given
    and the networks have a posterior (pixel space has none: the image is its own latent)."""
    if noise is None or nets.encode_posterior is None:
        return nets.encode_image(images_NHWC)
    mean, std = nets.encode_posterior(images_NHWC)
    return mean + std * noise.astype(mean.dtype)


def encode_image_halves(nets: Networks, t2i_images, i2t_images, fused: bool, noise=(None, None)):
    """Latents of both halves' images (the VAE is frozen: no gradient flows into it).

    noise: (t2i, i2t) posterior noise from `corrupt`, or (None, None) for the posterior mean.
    """
    if fused:
        both_noise = None if noise[0] is None else interleave(*noise)
        both = jax.lax.stop_gradient(encode_image(nets, interleave(t2i_images, i2t_images), both_noise))
        return half(both, 0), half(both, 1)
    return (jax.lax.stop_gradient(encode_image(nets, t2i_images, noise[0])),
            jax.lax.stop_gradient(encode_image(nets, i2t_images, noise[1])))


def interleave(a_BxN: jax.Array, b_BxN: jax.Array) -> jax.Array:
    """(B, ...) twice -> (2B, ...) as rows a0, b0, a1, b1, ...: the fused batch of both halves.

    Every device keeps its own rows of both halves (a concatenation would move half of each device's
    rows to other devices), and the result stays pinned batch-sharded.
    """
    both = jnp.stack([a_BxN, b_BxN], axis=1).reshape((2 * a_BxN.shape[0],) + a_BxN.shape[1:])
    return constrain(both, ("batch",) + (None,) * (both.ndim - 1))


def half(x_2BxN: jax.Array, k: int) -> jax.Array:
    """Rows of half k (0: text-to-image, 1: image-to-text) of an `interleave`d batch: (2B, ...) -> (B, ...)."""
    return constrain(x_2BxN.reshape((x_2BxN.shape[0] // 2, 2) + x_2BxN.shape[1:])[:, k],
                     ("batch",) + (None,) * (x_2BxN.ndim - 1))
