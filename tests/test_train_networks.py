"""The loss's networks from a plan (training/step.py make_networks): a frozen T5 costs no backward
pass, and VAE latents are posterior draws (mean + std * noise) in the release's latent units."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from train_helpers import EOS_ID, MASK_ID, PX, tiny_batch, tiny_model_config

from dual_diffusion.models.configs import VAEConfig
from dual_diffusion.sharding import DEFAULT_RULES, make_mesh
from dual_diffusion.training.loss import LossConfig, corrupt, dual_loss, encode_image_halves
from dual_diffusion.training.state import make_plan
from dual_diffusion.training.step import make_networks

BATCH = 8


def _plan(trainable="mask_row", vae=False):
    c = tiny_model_config()
    c.model.text_encoder_trainable = trainable
    c.model.text_encoder.num_layers = 2  # T5's share of the FLOPs well above rounding
    if vae:
        c.model.latent_space = "vae"
        c.model.vae = ml_collections.ConfigDict(VAEConfig(
            block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4).to_dict())
        t = c.model.transformer
        t.in_channels, t.out_channels, t.patch_size, t.sample_size = 4, 4, 2, PX // 2
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return make_plan(c, mesh, DEFAULT_RULES, MASK_ID)


def _compile(fn, *args):
    """(compiled fn, its FLOPs as XLA counts them)."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    return compiled, float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _as_split_by(plan, source, params, frozen):
    """The same weights (cut by plan `source`) cut into (params, frozen) by another plan (no second init)."""
    return plan.split.cut(source.split.network_states(params, frozen))


def test_frozen_t5_costs_no_backward_pass():
    """With "none" the gradient has no T5 part, and the step's FLOPs drop by T5's backward versus
    "mask_row". That backward covers the masked i2t rows only (captions hold no mask token) and costs
    about one T5 forward of those rows (activation gradients; T5's weights are frozen in both cases)."""
    batch, rng = jax.tree.map(jnp.asarray, tiny_batch(BATCH)), jax.random.key(0)
    cfg = LossConfig(MASK_ID, EOS_ID, caption_dropout=0.0)
    plans = {trainable: _plan(trainable) for trainable in ("mask_row", "none")}
    state, frozen = plans["mask_row"].init_fn()
    # The new heads start at zero (no gradient would reach T5): perturb the MM-DiT.
    leaves, tree = jax.tree.flatten(state["params"]["transformer"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = dict(state["params"], transformer=jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    flops, grads = {}, {}
    for trainable, plan in plans.items():
        p, f = _as_split_by(plan, plans["mask_row"], params, frozen)

        def grad(params, frozen, batch, plan=plan):  # everything an argument: nothing constant-folds away
            loss = lambda p: dual_loss(make_networks(plan, p, frozen, 0.0, 1.0), batch, rng, cfg)[0]  # noqa: E731
            return jax.grad(loss)(params)

        compiled, flops[trainable] = _compile(grad, p, f, batch)
        grads[trainable] = compiled(p, f, batch)
    ids = batch["i2t"]["text_ids"]
    _, t5_forward = _compile(lambda p, f, x: make_networks(plans["none"], p, f, 0.0, 1.0).encode_text(x),
                             *_as_split_by(plans["none"], plans["mask_row"], params, frozen), ids)
    assert set(grads["none"]) == {"transformer"} and "text_encoder" in grads["mask_row"]
    row = np.asarray(grads["mask_row"]["text_encoder"]["mask_row"])
    assert row.shape == (1, 32) and np.abs(row).sum() > 0  # mask_row: the gradient does reach T5's input
    saved = flops["mask_row"] - flops["none"]
    assert 0.8 * t5_forward < saved < 3.0 * t5_forward, (flops, t5_forward)
    # The MM-DiT's gradient is the same either way (T5's output is identical).
    for a, b in zip(jax.tree.leaves(grads["none"]["transformer"]), jax.tree.leaves(grads["mask_row"]["transformer"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_vae_latents_are_posterior_draws_in_latent_units():
    plan = _plan("none", vae=True)
    state, frozen = plan.init_fn()
    shift, scale = 0.0609, 1.5305
    batch = jax.tree.map(jnp.asarray, tiny_batch(BATCH))
    shape = (PX // 2, PX // 2, 4)

    @jax.jit
    def run(params, frozen, batch):
        nets = make_networks(plan, params, frozen, shift, scale)
        images = jnp.concatenate([batch["t2i"]["image"], batch["i2t"]["image"]])
        out = dict(moments=plan.split.merge("vae", params, frozen).encode_moments(images),
                   posterior=nets.encode_posterior(images), image=nets.encode_image(images))
        for mode in ("mean", "sample"):
            cfg = LossConfig(MASK_ID, EOS_ID, latent_sampling=mode)
            noised = corrupt(batch, jax.random.key(3), cfg, shape)
            noise = (noised.get("latent_noise_t2i"), noised.get("latent_noise_i2t"))
            out[mode] = jnp.concatenate(encode_image_halves(nets, batch["t2i"]["image"], batch["i2t"]["image"],
                                                            True, noise))
        out["noise"] = jnp.concatenate(noise)
        return out

    out = run(state["params"], frozen, batch)
    (mean, logvar), (got_mean, got_std) = out["moments"], out["posterior"]
    np.testing.assert_allclose(got_mean, (mean - shift) * scale, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_std, np.exp(0.5 * np.asarray(logvar)) * scale, rtol=1e-5)
    np.testing.assert_allclose(out["image"], got_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["mean"], got_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["sample"], got_mean + got_std * out["noise"], rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out["sample"] - out["mean"]).max()) > 1e-3
