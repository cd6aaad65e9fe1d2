"""The dual loss as a pure function, with small stand-in networks (no NNX, fast to compile)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import EOS_ID, MASK_ID, VOCAB, tiny_batch

from dual_diffusion.training.loss import (LossConfig, Networks, corrupt, dual_loss, encode_image_halves,
                                          per_example_losses)

D = 16


def _nets(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    emb = jax.random.normal(k[0], (VOCAB, D))
    w_img = jax.random.normal(k[1], (3 + D, 3)) * 0.1
    w_txt = jax.random.normal(k[2], (D + 3, VOCAB))

    def denoise(latents, hidden, timestep, image_rows=None, text_rows=None):
        velocity, logits = _denoise(latents, hidden, timestep)
        return (image_rows or (lambda x: x))(velocity), (text_rows or (lambda x: x))(logits)

    def _denoise(latents, hidden, timestep):
        pooled_text = hidden.mean(axis=1)[:, None, None, :]
        feat = jnp.concatenate([latents, jnp.broadcast_to(pooled_text, latents.shape[:3] + (D,))], -1)
        velocity = feat @ w_img + timestep[:, None, None, None] / 1000.0
        pooled_img = latents.mean(axis=(1, 2))[:, None, :]
        logits = jnp.concatenate([hidden, jnp.broadcast_to(pooled_img, hidden.shape[:2] + (3,))], -1) @ w_txt
        return velocity, logits

    return Networks(encode_text=lambda ids: emb[ids], encode_image=lambda x: x, denoise=denoise)


def _batch():
    return jax.tree.map(jnp.asarray, tiny_batch(8))


def test_fused_pass_equals_two_passes():
    nets, batch, rng = _nets(), _batch(), jax.random.key(1)
    fused = dual_loss(nets, batch, rng, LossConfig(MASK_ID, EOS_ID, fused=True))[1]
    split = dual_loss(nets, batch, rng, LossConfig(MASK_ID, EOS_ID, fused=False))[1]
    for k in fused:
        np.testing.assert_allclose(float(fused[k]), float(split[k]), rtol=1e-6, err_msg=k)


def test_caption_pass_without_gradient_keeps_the_mask_row_gradient_exact():
    """With only T5's mask row training, the captions' T5 pass runs without a backward: captions hold no mask
    token, so the mask row's gradient is unchanged to the bit, while other rows (which do not train) differ."""
    base, batch, rng = _nets(), _batch(), jax.random.key(4)
    assert not (np.asarray(batch["t2i"]["text_ids"]) == MASK_ID).any()
    emb = jax.random.normal(jax.random.key(5), (VOCAB, D))

    def grad(stop_caption):
        def loss(e):
            nets = Networks(encode_text=lambda ids: e[ids], encode_image=base.encode_image, denoise=base.denoise,
                            encode_caption=(lambda ids: jax.lax.stop_gradient(e[ids])) if stop_caption else None)
            return dual_loss(nets, batch, rng, LossConfig(MASK_ID, EOS_ID))[0]
        return np.asarray(jax.grad(loss)(emb))

    full, cheap = grad(False), grad(True)
    np.testing.assert_array_equal(cheap[MASK_ID], full[MASK_ID])
    assert np.abs(full[MASK_ID]).sum() > 0 and np.abs(cheap - full).max() > 1e-4


def test_loss_is_image_plus_lambda_text():
    nets, batch, rng = _nets(), _batch(), jax.random.key(2)
    _, m = dual_loss(nets, batch, rng, LossConfig(MASK_ID, EOS_ID, lambda_text=0.2))
    np.testing.assert_allclose(float(m["loss"]), float(m["loss_image"]) + 0.2 * float(m["loss_text"]), rtol=1e-6)
    assert float(m["loss_image"]) > 0 and float(m["loss_text"]) > 0


def test_corruption_respects_fixed_positions_and_caption_dropout():
    batch = _batch()
    keep = corrupt(batch, jax.random.key(3), LossConfig(MASK_ID, EOS_ID, caption_dropout=0.0), (16, 16, 3))
    drop = corrupt(batch, jax.random.key(3), LossConfig(MASK_ID, EOS_ID, caption_dropout=1.0), (16, 16, 3))
    np.testing.assert_array_equal(keep["caption_ids"], batch["t2i"]["text_ids"])
    assert (np.asarray(drop["caption_ids"]) == EOS_ID).all()  # the empty prompt: EOS then EOS padding
    noisy, fixed = np.asarray(keep["noisy_ids"]), np.asarray(batch["i2t"]["fixed_mask"])
    np.testing.assert_array_equal(noisy[fixed], np.asarray(batch["i2t"]["text_ids"])[fixed])
    assert (noisy[~fixed] == MASK_ID).any() and (noisy[~fixed] != MASK_ID).any()
    t = np.asarray(keep["t_B"])
    assert ((t >= 1e-3) & (t <= 1)).all() and len(np.unique(np.floor(t * 8))) == 8  # antithetic strata


def test_text_loss_counts_only_labelled_positions():
    nets, batch = _nets(), _batch()
    cfg = LossConfig(MASK_ID, EOS_ID)
    noised = corrupt(batch, jax.random.key(4), cfg, (16, 16, 3))
    batch["i2t"]["label_mask"] = jnp.zeros_like(batch["i2t"]["label_mask"])
    _, loss_text_B = per_example_losses(nets, batch, noised, cfg)
    np.testing.assert_array_equal(np.asarray(loss_text_B), 0.0)


def test_gradient_flows_to_text_encoder_input_of_both_halves():
    """The text half reads T5(masked ids), the image half T5(caption): both reach the embedding."""
    batch, cfg = _batch(), LossConfig(MASK_ID, EOS_ID, caption_dropout=0.0)
    base = _nets()

    def loss_of(emb):
        nets = Networks(encode_text=lambda ids: emb[ids], encode_image=base.encode_image, denoise=base.denoise)
        return dual_loss(nets, batch, jax.random.key(5), cfg)[0]

    g = np.asarray(jax.grad(loss_of)(jax.random.normal(jax.random.key(0), (VOCAB, D))))
    used_caption = np.unique(np.asarray(batch["t2i"]["text_ids"]))
    assert np.abs(g[MASK_ID]).sum() > 0  # masked ids of the text half
    assert np.abs(g[used_caption]).sum() > 0


def _stage3_batch():
    """tiny_batch with stage-3 label masks: the prompt fixed, answer + EOS padding labelled (release)."""
    batch = _batch()
    fixed = jnp.arange(batch["i2t"]["text_ids"].shape[1])[None, :] < jnp.arange(1, 9)[:, None] % 6 + 1
    batch["i2t"]["fixed_mask"], batch["i2t"]["label_mask"] = fixed, ~fixed
    return batch


def test_text_normalization_batch_tokens_is_release_rule():
    """loss_text = sum of weighted label-masked NLL / (B x L) ('batch_tokens'), or the mean of per-row means."""
    nets, batch = _nets(), _stage3_batch()
    for norm in ("batch_tokens", "per_example"):
        cfg = LossConfig(MASK_ID, EOS_ID, text_normalization=norm)
        noised = corrupt(batch, jax.random.key(6), cfg, (16, 16, 3))
        _, m = dual_loss(nets, batch, jax.random.key(6), cfg)
        _, logits = nets.denoise(batch["i2t"]["image"], nets.encode_text(noised["noisy_ids"]),
                                 jnp.zeros((8,), jnp.float32))
        # The release's formula, written out in numpy (SUBS: the mask logit is -inf; MDLM weight 1/t-ish).
        lg = np.asarray(logits, np.float64)
        lg[..., MASK_ID] = -np.inf
        logp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
        x0, xt = np.asarray(batch["i2t"]["text_ids"]), np.asarray(noised["noisy_ids"])
        nll = -np.take_along_axis(logp, x0[..., None], -1)[..., 0] * (xt == MASK_ID)
        t = np.asarray(noised["t_B"], np.float64)
        sigma, dsigma = -np.log1p(-(1 - 1e-3) * t), (1 - 1e-3) / (1 - (1 - 1e-3) * t)
        label = np.asarray(batch["i2t"]["label_mask"], np.float64)
        loss = nll * (dsigma / np.expm1(sigma))[:, None] * label
        want = loss.sum() / loss.size if norm == "batch_tokens" else (loss.sum(1) / label.sum(1)).mean()
        np.testing.assert_allclose(float(m["loss_text"]), want, rtol=1e-5, err_msg=norm)


def _posterior_nets():
    """Stand-in VAE posterior: mean and std vary per pixel (std in [0.2, 1.8])."""
    base = _nets()
    posterior = lambda x: (0.5 * x + 0.1, 1.0 + 0.8 * jnp.sin(3.0 * x))  # noqa: E731
    return Networks(encode_text=base.encode_text, encode_image=lambda x: posterior(x)[0], denoise=base.denoise,
                    encode_posterior=posterior)


def test_latent_sampling_mean_and_sample():
    nets, batch = _posterior_nets(), _batch()
    images = jnp.concatenate([batch["t2i"]["image"], batch["i2t"]["image"]])
    mean, std = nets.encode_posterior(images)
    latents = {}
    for fused in (True, False):
        for mode in ("mean", "sample"):
            cfg = LossConfig(MASK_ID, EOS_ID, latent_sampling=mode, fused=fused)
            noised = corrupt(batch, jax.random.key(7), cfg, (16, 16, 3))
            assert ("latent_noise_t2i" in noised) == (mode == "sample")
            halves = encode_image_halves(nets, batch["t2i"]["image"], batch["i2t"]["image"], fused,
                                         (noised.get("latent_noise_t2i"), noised.get("latent_noise_i2t")))
            latents[fused, mode] = np.asarray(jnp.concatenate(halves))
    np.testing.assert_array_equal(latents[True, "mean"], np.asarray(mean))
    np.testing.assert_allclose(latents[True, "sample"], latents[False, "sample"], rtol=1e-6)
    z = (latents[True, "sample"] - np.asarray(mean)) / np.asarray(std)  # 12288 standard normal draws
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.03
    # The draw is a function of the step's key (exact resume), and a new key gives a new draw.
    cfg = LossConfig(MASK_ID, EOS_ID)
    again = corrupt(batch, jax.random.key(7), cfg, (16, 16, 3))["latent_noise_t2i"]
    other = corrupt(batch, jax.random.key(8), cfg, (16, 16, 3))["latent_noise_t2i"]
    first = corrupt(batch, jax.random.key(7), cfg, (16, 16, 3))
    np.testing.assert_array_equal(again, first["latent_noise_t2i"])
    assert not np.allclose(again, other)
    # Folding the latent noise in left every other draw of a step as it was.
    old = corrupt(batch, jax.random.key(7), LossConfig(MASK_ID, EOS_ID, latent_sampling="mean"), (16, 16, 3))
    for k in old:
        np.testing.assert_array_equal(old[k], first[k], err_msg=k)
    with pytest.raises(ValueError, match="loss.latent_sampling='mode'"):
        LossConfig(MASK_ID, EOS_ID, latent_sampling="mode")
