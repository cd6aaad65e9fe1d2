"""Masked (absorbing-state) diffusion: schedules, antithetic times, masking, SUBS loss."""
import math

import dual_diffusion  # noqa: F401  (flax config before anything else)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dual_diffusion.diffusion.masked import (Schedule, antithetic_times, mask_tokens, masked_diffusion_loss,
                                             subs_nll)

EPS = 1e-3
MASK = 7
V = 8


@pytest.mark.parametrize("kind", ["loglinear", "linear", "cosine"])
def test_schedule_identities(kind):
    sch = Schedule(kind, EPS)
    t = jnp.linspace(EPS, 1.0, 101)
    move = sch.move(t)
    np.testing.assert_allclose(np.exp(-sch.sigma(t)), 1.0 - move, rtol=1e-5)
    # dsigma is the derivative of sigma, and w = dsigma / expm1(sigma) = move' / move.
    dsig_ad = jax.vmap(jax.grad(sch.sigma))(t)
    np.testing.assert_allclose(sch.dsigma(t), dsig_ad, rtol=1e-4)
    dmove_ad = jax.vmap(jax.grad(sch.move))(t)
    np.testing.assert_allclose(sch.loss_weight(t), dmove_ad / move, rtol=2e-4)
    assert float(sch.move(1.0)) == pytest.approx(1.0 - EPS, rel=1e-5)
    assert np.all(np.diff(np.asarray(move)) > 0)


def test_loglinear_matches_reference_expressions():
    """REFERENCE.md: move = (1-eps) t, sigma = -log(1-(1-eps)t), dsigma = (1-eps)/(1-(1-eps)t), w ~ 1/t."""
    sch = Schedule()
    t = np.linspace(EPS, 1.0, 57).astype(np.float64)
    move = (1 - EPS) * t
    np.testing.assert_allclose(sch.sigma(t), -np.log(1 - move), rtol=1e-5)
    np.testing.assert_allclose(sch.dsigma(t), (1 - EPS) / (1 - move), rtol=5e-5)  # float32 near t = 1
    # The release's expression (torch_anchor.py): (1-eps)/(1-move)/expm1(-log1p(-move)).
    w_release = (1 - EPS) / (1 - move) / np.expm1(-np.log1p(-move))
    np.testing.assert_allclose(sch.loss_weight(t), w_release, rtol=1e-4)
    np.testing.assert_allclose(sch.loss_weight(t), 1.0 / t, rtol=1e-4)
    with pytest.raises(ValueError, match="kind='nope'"):
        Schedule("nope")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_antithetic_times_cover_strata(batch):
    for seed in range(5):
        t = np.sort(np.asarray(antithetic_times(jax.random.key(seed), batch, EPS), np.float64))
        assert t.shape == (batch,) and t.min() >= EPS and t.max() <= 1.0
        # Exactly one time in each of the B equal strata of [eps, 1].
        strata = np.floor((t - EPS) / (1 - EPS) * batch + 1e-6).astype(int)
        np.testing.assert_array_equal(np.sort(strata), np.arange(batch))
        # Neighbours are exactly one stratum apart (a single shared offset).
        np.testing.assert_allclose(np.diff(t), (1 - EPS) / batch, atol=1e-5)


def test_mask_tokens_rate_and_maskable():
    B, L = 4, 4096
    ids = jax.random.randint(jax.random.key(0), (B, L), 0, MASK)
    t = jnp.array([0.1, 0.4, 0.7, 1.0])
    maskable = jnp.arange(L)[None, :] >= 1024
    noisy = mask_tokens(jax.random.key(1), ids, t, MASK, Schedule(), jnp.broadcast_to(maskable, (B, L)))
    is_m = np.asarray(noisy == MASK)
    assert not is_m[:, :1024].any(), "non-maskable positions were masked"
    np.testing.assert_array_equal(np.asarray(noisy)[~is_m], np.asarray(ids)[~is_m])
    n = 3072
    p = (1 - EPS) * np.asarray(t)
    rate = is_m[:, 1024:].mean(1)
    assert np.all(np.abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-6), (rate, p)


def _batch(seed=0, B=6, L=12):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    target = jax.random.randint(k1, (B, L), 0, MASK)
    t = antithetic_times(k2, B, EPS)
    noisy = mask_tokens(k3, target, t, MASK)
    logits = jax.random.normal(k4, (B, L, V)) * 3
    return logits, target, noisy, t


def test_loss_zero_where_nothing_masked():
    logits, target, _, t = _batch()
    np.testing.assert_array_equal(masked_diffusion_loss(logits, target, target, t, MASK), 0.0)


def test_perfect_predictor_zero_and_uniform_closed_form():
    _, target, noisy, t = _batch(1)
    B, L = target.shape
    perfect = 1e4 * jax.nn.one_hot(target, V)
    np.testing.assert_allclose(masked_diffusion_loss(perfect, target, noisy, t, MASK), 0.0, atol=1e-6)
    # Uniform logits: p = 1/(V-1) over the non-mask tokens (SUBS), so
    # loss_b = w(t_b) * n_masked_b * log(V-1) / L.
    uniform = jnp.zeros((B, L, V)).at[..., MASK].set(50.0)  # the mask logit is ignored whatever its value
    n_masked = np.asarray(noisy == MASK).sum(1)
    expected = np.asarray(Schedule().loss_weight(t)) * n_masked * math.log(V - 1) / L
    assert n_masked.sum() > 0
    np.testing.assert_allclose(masked_diffusion_loss(uniform, target, noisy, t, MASK), expected, rtol=1e-5)


def test_label_mask_and_padding_normalisation():
    logits, target, _, t = _batch(2, B=3, L=10)
    noisy = jnp.full_like(target, MASK)
    nll = np.asarray(subs_nll(logits, target, MASK))
    w = np.asarray(Schedule().loss_weight(t))
    label = jnp.arange(10)[None, :] >= 4  # answer-only
    pad = jnp.arange(10)[None, :] >= 8
    label, pad = jnp.broadcast_to(label, (3, 10)), jnp.broadcast_to(pad, (3, 10))
    got = masked_diffusion_loss(logits, target, noisy, t, MASK, label_mask_BxL=label)
    np.testing.assert_allclose(got, w * nll[:, 4:].sum(1) / 6, rtol=1e-5)
    got = masked_diffusion_loss(logits, target, noisy, t, MASK, label_mask_BxL=label, count_padding=False,
                                pad_mask_BxL=pad)
    np.testing.assert_allclose(got, w * nll[:, 4:8].sum(1) / 4, rtol=1e-5)
    with pytest.raises(ValueError, match="pad_mask"):
        masked_diffusion_loss(logits, target, noisy, t, MASK, count_padding=False)


def test_matches_release_text_loss_in_torch():
    """The release's text loss (torch_anchor.py) equals the batch mean of ours."""
    logits, target, noisy, t = _batch(3, B=5, L=16)
    lg = torch.tensor(np.asarray(logits), dtype=torch.float32)
    ids, xt, tt = (torch.tensor(np.asarray(a)) for a in (target, noisy, t))
    lg[:, :, MASK] += -1e6
    logp = lg - torch.logsumexp(lg, -1, keepdim=True)
    lp = torch.gather(logp, -1, ids[..., None].long())[..., 0]
    lp = torch.where(xt == MASK, lp, torch.zeros_like(lp))
    move = (1 - EPS) * tt
    w = (1 - EPS) / (1 - move) / torch.expm1(-torch.log1p(-move))
    ref = float((-lp * w[:, None]).mean())
    ours = float(jnp.mean(masked_diffusion_loss(logits, target, noisy, t, MASK)))
    assert ours == pytest.approx(ref, rel=1e-5)


def _release_sft_text_loss(logits, x0, xt, t, label_mask, per_example=False):
    """Transcription of the release's stage-3 text loss in torch: SUBS log-probs, MDLM weight
    dsigma / expm1(sigma), times the label mask (answer + EOS padding), summed and divided by
    B x L (`ignore_padding` false); per_example: each row by its own label count, then the mean."""
    lg = torch.tensor(np.asarray(logits), dtype=torch.float32)
    ids, xt, tt = (torch.tensor(np.asarray(a)) for a in (x0, xt, t))
    lab = torch.tensor(np.asarray(label_mask), dtype=torch.float32)
    lg[:, :, MASK] += -1e6
    logp = lg - torch.logsumexp(lg, -1, keepdim=True)
    lp = torch.gather(logp, -1, ids[..., None].long())[..., 0]
    lp = torch.where(xt == MASK, lp, torch.zeros_like(lp))
    sigma = -torch.log1p(-(1 - EPS) * tt)
    dsigma = (1 - EPS) / (1 - (1 - EPS) * tt)
    loss = -lp * (dsigma / torch.expm1(sigma))[:, None] * lab
    if per_example:
        return float((loss.sum(1) / lab.sum(1)).mean())
    return float(loss.sum() / (lab.shape[0] * lab.shape[1]))


def test_stage3_normalisations_match_release_transcription():
    """Known batch with stage-3 rows: a fixed prompt of varying length, then answer + EOS padding labelled."""
    B, L = 4, 16
    logits, target, _, t = _batch(5, B=B, L=L)
    prompt_len = jnp.array([3, 6, 9, 12])
    fixed = jnp.arange(L)[None, :] < prompt_len[:, None]
    noisy = mask_tokens(jax.random.key(9), target, t, MASK, maskable_BxL=~fixed)
    label = ~fixed  # the release: the label mask padded with ones after the answer
    batch_tokens = float(jnp.mean(masked_diffusion_loss(logits, target, noisy, t, MASK, label_mask_BxL=label,
                                                        normalization="batch_tokens")))
    per_example = float(jnp.mean(masked_diffusion_loss(logits, target, noisy, t, MASK, label_mask_BxL=label,
                                                       normalization="per_example")))
    assert batch_tokens == pytest.approx(_release_sft_text_loss(logits, target, noisy, t, label), rel=1e-5)
    assert per_example == pytest.approx(_release_sft_text_loss(logits, target, noisy, t, label, True), rel=1e-5)
    assert abs(batch_tokens - per_example) > 1e-3 * per_example  # the two rules really differ here
    with pytest.raises(ValueError, match="normalization='tokens'"):
        masked_diffusion_loss(logits, target, noisy, t, MASK, normalization="tokens")


def test_gradient_matches_autodiff_and_bf16():
    logits, target, noisy, t = _batch(4)

    def plain(lg):  # straightforward log-softmax version
        lg = jnp.where(jnp.arange(V) == MASK, -jnp.inf, lg.astype(jnp.float32))
        lp = jnp.take_along_axis(jax.nn.log_softmax(lg, -1), target[..., None], -1)[..., 0]
        nll = jnp.where(noisy == MASK, -lp, 0.0)
        return jnp.sum(Schedule().loss_weight(t)[:, None] * nll) / nll.size

    ours = lambda lg: jnp.mean(masked_diffusion_loss(lg, target, noisy, t, MASK))  # noqa: E731
    np.testing.assert_allclose(ours(logits), plain(logits), rtol=1e-5)
    g_ours, g_plain = jax.jit(jax.grad(ours))(logits), jax.grad(plain)(logits)
    np.testing.assert_allclose(g_ours, g_plain, atol=1e-6)
    assert np.all(np.asarray(g_ours)[..., MASK] == 0)
    lb = logits.astype(jnp.bfloat16)
    g_b = jax.grad(ours)(lb)
    assert g_b.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours(lb), plain(lb.astype(jnp.float32)), rtol=1e-5)


def test_loss_memory_at_most_one_fp32_copy():
    """Compiled forward+backward on bf16 logits keeps at most one float32 (B, L, V) buffer."""
    B, L, Vb = 2, 64, 4096

    def f(lg, tgt, noisy, t):
        return jnp.mean(masked_diffusion_loss(lg, tgt, noisy, t, 5))

    args = (jax.ShapeDtypeStruct((B, L, Vb), jnp.bfloat16), jax.ShapeDtypeStruct((B, L), jnp.int32),
            jax.ShapeDtypeStruct((B, L), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.float32))
    mem = jax.jit(jax.grad(f)).lower(*args).compile().memory_analysis()
    if mem is None:
        pytest.skip("backend gives no memory analysis")
    fp32_copy = B * L * Vb * 4
    assert mem.temp_size_in_bytes <= 1.1 * fp32_copy, (mem.temp_size_in_bytes, fp32_copy)
