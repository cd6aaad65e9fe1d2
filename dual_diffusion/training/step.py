"""The jitted train step: both losses, one optax update, EMA, non-finite skip.

`make_train_step(plan, loss_cfg, ...)` returns `step(state, frozen, batch) ->
(state, metrics)`, jitted with the plan's shardings and the state donated.
Compute dtype comes from Runtime.dtype inside the networks; the params in the
state stay float32 (master weights); each kernel is cast to the compute dtype on its shard
and gathered where a matmul reads it (layers.matmul, sharding.read_weight), frozen ones from the placement
sharding.frozen_rules gives them. With `microbatches = n`, the global batch
is split into n strided slices (every device keeps its share of each slice),
gradients are summed over a lax.scan and averaged.

A step whose loss or gradient norm is not finite leaves params, optimizer and
EMA untouched and increments `state["nonfinite"]` (the step counter still moves,
so data and RNG stay aligned with an uninterrupted run).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dual_diffusion.sharding import activation_sharding, frozen_rules, weights_placed_by
from dual_diffusion.training.loss import LossConfig, Networks, combine, corrupt, latent_shape, per_example_losses
from dual_diffusion.training.state import Plan


def make_networks(plan: Plan, params: dict, frozen: dict, latent_shift: float, latent_scale: float) -> Networks:
    """The loss's network callables over (params, frozen).

    A T5 with nothing in `params` (text_encoder_trainable "none") is wrapped in
    stop_gradient: it costs a forward pass only, never a backward one. With only the
    mask row training, T5 reads it in place of its table's row, and the captions (which
    hold no mask token) run forward only. Both halves' rows go through T5's layers in one
    pass (`encode_texts`), so each layer's weights are gathered once for both.
    """
    transformer = plan.split.merge("transformer", params, frozen)
    text_encoder = plan.split.merge("text_encoder", params, frozen)
    row = dict(mask_row_1xD=plan.split.mask_row(params), mask_id=plan.mask_id)
    trains_t5 = plan.split.trainable.get("text_encoder")  # "all": T5's weights are trainable ones
    # Captions take no gradient unless the whole T5 trains (the mask row never occurs in them).
    caption_grad = bool(trains_t5)
    stored = None if trains_t5 else frozen_rules(plan.rules, plan.frozen_placement)

    def encode_text(ids):
        with weights_placed_by(stored):
            hidden = text_encoder(ids, **row)
        return hidden if "text_encoder" in params else jax.lax.stop_gradient(hidden)

    def encode_texts(caption_ids, noisy_ids):
        with weights_placed_by(stored):
            hidden = text_encoder.encode_two(caption_ids, noisy_ids, differentiate_frozen=caption_grad, **row)
        return hidden if "text_encoder" in params else jax.lax.stop_gradient(hidden)

    encode_caption = encode_text if caption_grad else _frozen(encode_text)
    nets = dict(encode_text=encode_text, denoise=transformer, encode_caption=encode_caption,
                encode_texts=encode_texts)
    if "vae" not in plan.split.graphdefs:  # pixel space (demo): the [-1, 1] image is the latent
        return Networks(encode_image=lambda images: images.astype(jnp.float32), **nets)
    vae = plan.split.merge("vae", params, frozen)

    def encode_posterior(images):
        """(mean, std) of the VAE posterior in latent units: a draw is (z - shift) * scale."""
        with weights_placed_by(frozen_rules(plan.rules, plan.frozen_placement)):
            mean, logvar = vae.encode_moments(images)
        return (mean - latent_shift) * latent_scale, jnp.exp(0.5 * logvar) * latent_scale

    return Networks(encode_image=lambda images: encode_posterior(images)[0], encode_posterior=encode_posterior,
                    **nets)


def _frozen(fn):
    return lambda *args: jax.lax.stop_gradient(fn(*args))


def _split_microbatches(batch: dict, n: int) -> dict:
    """(B, ...) -> (n, B/n, ...), slice j = rows j, j+n, j+2n, ... (a strided slice stays spread over devices)."""
    def one(x):
        if x.shape[0] % n:
            raise ValueError(f"train.microbatches={n} does not divide the batch dimension {x.shape[0]}")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(one, batch)


def loss_and_grads(plan: Plan, loss_cfg: LossConfig, params, frozen, batch, rng, microbatches: int,
                   latent_shift: float, latent_scale: float):
    """Mean loss, metrics and gradients; the randomness is drawn once for the global batch."""
    nets = lambda p: make_networks(plan, p, frozen, latent_shift, latent_scale)
    noised = corrupt(batch, rng, loss_cfg, latent_shape(nets(params), batch["t2i"]["image"]))

    def loss_fn(p, mb, nz):
        loss_image_B, loss_text_B = per_example_losses(nets(p), mb, nz, loss_cfg)
        metrics = combine(jnp.mean(loss_image_B), jnp.mean(loss_text_B), loss_cfg)
        return metrics["loss"], metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (_, metrics), grads = grad_fn(params, batch, noised)
        return metrics, grads

    def body(carry, xs):
        (_, metrics), grads = grad_fn(params, *xs)
        acc_g, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, grads), jax.tree.map(jnp.add, acc_m, metrics)), None

    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_m = {k: jnp.zeros((), jnp.float32) for k in ("loss", "loss_image", "loss_text")}
    xs = (_split_microbatches(batch, microbatches), _split_microbatches(noised, microbatches))
    (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), xs)
    scale = 1.0 / microbatches
    return jax.tree.map(lambda m: m * scale, metrics), jax.tree.map(lambda g: g * scale, grads)


def train_step(state: dict, frozen: dict, batch: dict, *, plan: Plan, loss_cfg: LossConfig, microbatches: int,
               ema_decay: float, latent_shift: float = 0.0, latent_scale: float = 1.0,
               loss_spike_factor: float = 0.0) -> tuple[dict, dict]:
    """One update. With `state["loss_window"]` (the last W applied losses, NaN until filled; present
    only when train.loss_spike_factor > 0), a loss above loss_spike_factor x their median once the
    window is full is skipped like a non-finite one, and does not enter the window."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    params = state["params"]
    metrics, grads = loss_and_grads(plan, loss_cfg, params, frozen, batch, rng, microbatches,
                                    latent_shift, latent_scale)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = plan.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    applied = finite
    if "loss_window" in state:  # the optional loss-spike guard
        window = state["loss_window"]
        spike = jnp.all(jnp.isfinite(window)) & (metrics["loss"] > loss_spike_factor * jnp.median(window))
        applied = finite & ~spike
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(applied, a, b), new, old)

    new = dict(state)
    new["step"] = state["step"] + 1
    new["params"] = keep(new_params, params)
    new["opt_state"] = keep(opt_state, state["opt_state"])
    if state["ema"] is not None:
        ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1.0 - ema_decay), state["ema"], new_params)
        new["ema"] = keep(ema, state["ema"])
    new["nonfinite"] = state["nonfinite"] + (~finite).astype(jnp.int32)
    lr = plan.schedule(state["step"])  # the rate this step used (skipped steps included)
    out = dict(metrics, grad_norm=grad_norm, lr=jnp.asarray(lr, jnp.float32), finite=finite,
               nonfinite_total=new["nonfinite"])
    if "loss_window" in state:
        rolled = jnp.roll(window, -1).at[-1].set(metrics["loss"].astype(window.dtype))
        new["loss_window"] = jnp.where(applied, rolled, window)
        out["spike"] = spike
    return new, out


def make_train_step(plan: Plan, loss_cfg: LossConfig, batch_shardings: Any, *, microbatches: int = 1,
                    ema_decay: float = 0.0, latent_shift: float = 0.0, latent_scale: float = 1.0,
                    loss_spike_factor: float = 0.0):
    """The jitted step(state, frozen, batch) -> (state, metrics); `state` is donated."""
    def fn(state, frozen, batch):
        # Traced under the plan's mesh: activations are pinned batch-sharded and kernels target its platform.
        with activation_sharding(plan.mesh, plan.rules):
            return train_step(state, frozen, batch, plan=plan, loss_cfg=loss_cfg, microbatches=microbatches,
                              ema_decay=ema_decay, latent_shift=latent_shift, latent_scale=latent_scale,
                              loss_spike_factor=loss_spike_factor)

    return jax.jit(fn, in_shardings=(plan.state_shardings, plan.frozen_shardings, batch_shardings),
                   out_shardings=(plan.state_shardings, None), donate_argnums=(0,))
