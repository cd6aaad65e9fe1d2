"""The dual loss as a pure function, with small stand-in networks (no NNX, fast to compile)."""
import jax
import jax.numpy as jnp
import numpy as np
from train_helpers import EOS_ID, MASK_ID, VOCAB, tiny_batch

from dual_diffusion.training.loss import LossConfig, Networks, corrupt, dual_loss, per_example_losses

D = 16


def _nets(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    emb = jax.random.normal(k[0], (VOCAB, D))
    w_img = jax.random.normal(k[1], (3 + D, 3)) * 0.1
    w_txt = jax.random.normal(k[2], (D + 3, VOCAB))

    def denoise(latents, hidden, timestep):
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
