"""Text sampling for masked diffusion: ancestral, confidence-based and semi-autoregressive.

REFERENCE.md, Inference. All samplers share one loop (`lax.while_loop`, static
shapes): predict log p(x0 | x_t) for every position, update some masked
positions, repeat. Positions with `fixed=True` (a VQA prompt) keep their ids;
the others start masked and are the only ones ever written.

Prediction caching: D-DiT's text network is time-agnostic (no timestep input for
text, the image is clean), so `logits_fn` is a function of the ids alone and its
output is reused (inside `lax.cond`) until some token changes. A `logits_fn` that
is not a pure function of the ids would be wrong to cache; none is in D-DiT.

Precision of categorical draws: tokens are drawn by Gumbel-max on float32
log-probabilities with `jax.random.gumbel(mode="highest")`, which builds the
uniform from 64 random bits and uses log1p below 1/2, so the Gumbel CDF is
exact to float32 rounding over its whole range (upper tail beyond 40). The
release's race `argmax p (t - s) / -log(u + 1e-10)` with a 24-bit float32 u
caps the exponential below at ~6e-8 (Gumbel ~16.6) and quantises it coarsely
there, so tokens with probability below ~1e-7 of the top one are (nearly) never
drawn: summed over a 32k vocabulary this tail is what a lower temperature
removes (REFERENCE.md, known weaknesses). Working with log-probs, not
probabilities, also avoids underflow of tiny p.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from dual_diffusion.diffusion import row_keys
from dual_diffusion.diffusion.masked import Schedule

LogitsFn = Callable[[jax.Array], jax.Array]
# Fraction of a segment's masked tokens still masked at progress tau in [0, 1].
UNMASK_SCHEDULES = {
    "linear": lambda tau: 1.0 - tau,
    "cosine": lambda tau: jnp.cos(0.5 * jnp.pi * tau),  # MaskGIT: few tokens first, many last
}
CONFIDENCES = ("prob", "margin", "random")
METHODS = ("ancestral", "confidence", "semi_ar")


def gumbel_argmax(rng: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One exact draw per row of float32 log-probs (..., V) -> int32 (...); rng: one key or one per row."""
    g = row_keys.draw(rng, lambda key, shape: jax.random.gumbel(key, shape, jnp.float32, mode="highest"),
                      log_probs.shape)
    return jnp.argmax(log_probs.astype(jnp.float32) + g, axis=-1).astype(jnp.int32)


def _top_k(lp, k):
    kth = jax.lax.top_k(lp, k)[0][..., -1:]
    return jnp.where(lp >= kth, lp, -jnp.inf)


def _top_p(lp, p):
    sorted_lp = -jnp.sort(-lp, axis=-1)
    probs = jnp.exp(sorted_lp)
    # Keep the smallest prefix whose mass reaches p (always at least the top token).
    n_keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < p, axis=-1, keepdims=True)
    thr = jnp.take_along_axis(sorted_lp, n_keep - 1, axis=-1)
    return jnp.where(lp >= thr, lp, -jnp.inf)


def process_log_probs(logits_BxLxV: jax.Array, mask_id: int, *, uncond_logits_BxLxV: jax.Array | None = None,
                      cfg_scale: float = 1.0, suppress_eos_BxL: jax.Array | None = None,
                      eos_id: int | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> jax.Array:
    """Network logits -> the float32 log-probs (B, L, V) the samplers draw from.

    SUBS (mask never predicted) -> CFG over the image in log-prob space,
    log p = log p_u + w (log p_c - log p_u) -> EOS ban where `suppress_eos_BxL`
    -> temperature (0: left as is, the samplers take the argmax) -> top-k / top-p.
    """
    V = logits_BxLxV.shape[-1]
    is_mask = jnp.arange(V) == mask_id

    def subs_log_softmax(logits):
        return jax.nn.log_softmax(jnp.where(is_mask, -jnp.inf, logits.astype(jnp.float32)), axis=-1)

    lp = subs_log_softmax(logits_BxLxV)
    if uncond_logits_BxLxV is not None and cfg_scale != 1.0:
        lp_u = subs_log_softmax(uncond_logits_BxLxV)
        lp = jnp.where(is_mask, -jnp.inf, lp_u + cfg_scale * (lp - lp_u))  # mask column: -inf - -inf
    if suppress_eos_BxL is not None and eos_id is not None:
        lp = jnp.where(suppress_eos_BxL[..., None] & (jnp.arange(V) == eos_id), -jnp.inf, lp)
    if temperature > 0 and temperature != 1.0:
        lp = lp / temperature
    if top_k:
        lp = _top_k(lp, top_k)
    if top_p < 1.0:
        lp = _top_p(jax.nn.log_softmax(lp, axis=-1), top_p)
    return jax.nn.log_softmax(lp, axis=-1)


def ancestral_update(rng: jax.Array, x_BxL: jax.Array, log_probs_BxLxV: jax.Array, free_BxL: jax.Array,
                     stay_prob, mask_id: int, greedy: bool = False) -> jax.Array:
    """One MDLM ancestral step t -> s on the masked free positions.

    The release draws from q = [p(x0) (t - s), s] over (tokens, mask) normalised by t;
    equivalently a masked token stays masked with probability stay_prob = move(s)/move(t)
    and otherwise takes a draw from p(x0). Drawing the two parts separately is exact and
    keeps the tiny probabilities in log space.
    """
    rng_tok, rng_rev = row_keys.split(rng)
    cand = jnp.argmax(log_probs_BxLxV, -1).astype(jnp.int32) if greedy else gumbel_argmax(rng_tok, log_probs_BxLxV)
    reveal = (x_BxL == mask_id) & free_BxL & (row_keys.draw(rng_rev, jax.random.uniform, x_BxL.shape) >= stay_prob)
    return jnp.where(reveal, cand, x_BxL)


def _ranks(score_BxL):
    """0 for the highest score in each row, 1 for the next, ... (ties broken by position)."""
    order = jnp.argsort(-score_BxL, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True)


def sample_text(logits_fn: LogitsFn, ids_BxL: jax.Array, fixed_BxL: jax.Array, rng: jax.Array, *,
                method: str = "ancestral", steps: int, mask_id: int, schedule: Schedule = Schedule(),
                t_min: float = 1e-5, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                eos_id: int | None = None, min_new_tokens: int = 0,
                uncond_logits_fn: LogitsFn | None = None, cfg_scale: float = 1.0,
                unmask_schedule: str = "linear", confidence: str = "prob", threshold: float | None = None,
                num_blocks: int = 4, early_stop: bool = True, return_stats: bool = False):
    """Fills the non-fixed positions of `ids_BxL`; returns int32 ids (B, L) [, stats].

    logits_fn(ids_BxL) -> logits (B, L, V): the network closure (T5 + MM-DiT + image).
    fixed_BxL: True where the caller's id is kept (prompt); every other position
      starts as `mask_id` and is generated.
    rng: one key, or one per row (B,): then each row draws from its own key only
      (diffusion/row_keys.py), so its text does not depend on the rest of the batch.
    method:
      "ancestral"  the release's MDLM sampler on the grid linspace(1, t_min, steps + 1):
                   each masked token is revealed with probability 1 - move(s)/move(t)
                   ((t - s)/t for loglinear) with a token drawn from p(x0); then one
                   final argmax fills what is left.
      "confidence" each step draws a candidate for every masked position and reveals
                   the k most confident; k follows `unmask_schedule` ("linear",
                   "cosine") over `steps`, or, with `threshold`, all candidates with
                   confidence >= threshold (at least one; the last step reveals all).
                   confidence: "prob" (p of the candidate), "margin" (p1 - p2) or
                   "random" (uniform order: MDLM with a fixed number per step).
      "semi_ar"    each row's free positions are cut into `num_blocks` contiguous
                   blocks, generated left to right, `steps // num_blocks` confidence
                   steps each (steps must be divisible by num_blocks).
    Options: temperature (0 = argmax candidates), top_k, top_p, EOS ban on the first
      `min_new_tokens` free positions (against empty answers), CFG over the image:
      `uncond_logits_fn(ids)` is the same network with the null image embedding, and
      log p = log p_u + cfg_scale (log p_c - log p_u) (two forward passes per
      prediction); early_stop ends the loop once nothing is masked.
    stats: {"nfe": predictions made, "forward_passes": network calls, "steps": loop steps}.
    The loop is one `lax.while_loop`; jit the caller with the network's state traced.
    """
    if method not in METHODS:
        raise ValueError(f"sample_text: method={method!r}; expected one of {METHODS}")
    if unmask_schedule not in UNMASK_SCHEDULES:
        raise ValueError(f"sample_text: unmask_schedule={unmask_schedule!r}; expected one of "
                         f"{sorted(UNMASK_SCHEDULES)}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"sample_text: confidence={confidence!r}; expected one of {CONFIDENCES}")
    if steps < 1:
        raise ValueError(f"sample_text: steps={steps}; expected >= 1")
    if ids_BxL.shape != fixed_BxL.shape or ids_BxL.ndim != 2:
        raise ValueError(f"sample_text: ids {ids_BxL.shape} and fixed {fixed_BxL.shape} must both be (B, L)")
    n_segments = num_blocks if method == "semi_ar" else 1
    if steps % n_segments:
        raise ValueError(f"sample_text: semi_ar needs steps ({steps}) divisible by num_blocks ({num_blocks})")
    seg_steps = steps // n_segments
    guided = uncond_logits_fn is not None and cfg_scale != 1.0

    fixed = fixed_BxL.astype(bool)
    free = ~fixed
    x0 = jnp.where(fixed, ids_BxL, mask_id).astype(jnp.int32)
    gen_index = jnp.cumsum(free, axis=1) - 1  # rank of each free position in its row
    n_free = jnp.maximum(jnp.sum(free, axis=1, keepdims=True), 1)
    block_id = jnp.where(free, gen_index * n_segments // n_free, -1)
    suppress_eos = free & (gen_index < min_new_tokens)
    ts = jnp.linspace(1.0, t_min, steps + 1, dtype=jnp.float32)
    frac_left = UNMASK_SCHEDULES[unmask_schedule]

    def predict(x):
        lu = uncond_logits_fn(x) if guided else None
        return process_log_probs(logits_fn(x), mask_id, uncond_logits_BxLxV=lu, cfg_scale=cfg_scale,
                                 suppress_eos_BxL=suppress_eos, eos_id=eos_id, temperature=temperature,
                                 top_k=top_k, top_p=top_p)

    def candidates(rng, lp):
        return jnp.argmax(lp, axis=-1).astype(jnp.int32) if temperature == 0 else gumbel_argmax(rng, lp)

    def ancestral_step(i, x, lp, n0, rng):
        stay = schedule.stay_masked_prob(ts[i], ts[i + 1])
        return ancestral_update(rng, x, lp, free, stay, mask_id, greedy=temperature == 0), n0

    def confidence_step(i, x, lp, n0, rng):
        rng_tok, rng_conf = row_keys.split(rng)
        seg, j = i // seg_steps, i % seg_steps
        eligible = (x == mask_id) & free & ((block_id == seg) if method == "semi_ar" else True)
        n_now = jnp.sum(eligible, axis=1)
        n0 = jnp.where(j == 0, n_now, n0)  # masked count at the segment's start
        cand = candidates(rng_tok, lp)
        if confidence == "prob":
            score = jnp.take_along_axis(lp, cand[..., None], axis=-1)[..., 0]
        elif confidence == "margin":
            top2 = jax.lax.top_k(lp, 2)[0]
            score = jnp.exp(top2[..., 0]) - jnp.exp(top2[..., 1])
        else:
            score = row_keys.draw(rng_conf, jax.random.uniform, x.shape)
        score = jnp.where(eligible, score, -jnp.inf)
        last = j == seg_steps - 1
        if threshold is None:
            left_after = jnp.floor(n0 * frac_left((j + 1) / seg_steps) + 1e-4).astype(jnp.int32)
            k = jnp.maximum(n_now - jnp.where(last, 0, left_after), 0)
        else:
            conf_prob = jnp.exp(score) if confidence == "prob" else score
            above = jnp.sum(eligible & (conf_prob >= threshold), axis=1)
            k = jnp.where(last, n_now, jnp.minimum(jnp.maximum(above, 1), n_now))
        reveal = eligible & (_ranks(score) < k[:, None])
        return jnp.where(reveal, cand, x), n0

    step = ancestral_step if method == "ancestral" else confidence_step
    B = x0.shape[0]

    def any_masked(x):
        return jnp.any((x == mask_id) & free)

    def cond(state):
        # Iterations 0..steps-1 are sampling steps; iteration `steps` is the release's final
        # argmax ("noise removal"), run only if something is still masked. Keeping it in the
        # loop means the network appears once in the compiled program.
        i, x = state[0], state[1]
        sampling = (i < steps) & (any_masked(x) if early_stop else True)
        return sampling | ((i == steps) & any_masked(x))

    def fill(i, x, lp, n0, rng):
        return jnp.where((x == mask_id) & free, jnp.argmax(lp, axis=-1).astype(jnp.int32), x), n0

    def body(state):
        i, x, lp, valid, n0, nfe, key = state
        lp, nfe = jax.lax.cond(valid, lambda: (lp, nfe), lambda: (predict(x), nfe + 1))
        key, sub = row_keys.split(key)
        x_new, n0 = jax.lax.cond(i < steps, step, fill, i, x, lp, n0, sub)
        # Prediction caching: the next step reuses lp unless a token changed.
        return i + 1, x_new, lp, ~jnp.any(x_new != x), n0, nfe, key

    lp_shape = jax.eval_shape(predict, x0)  # abstract trace only: no second copy of the network
    state = (jnp.int32(0), x0, jnp.zeros(lp_shape.shape, jnp.float32), jnp.bool_(False),
             jnp.zeros((B,), jnp.int32), jnp.int32(0), rng)
    i, x, _, _, _, nfe, _ = jax.lax.while_loop(cond, body, state)
    if return_stats:
        return x, {"nfe": nfe, "forward_passes": nfe * (2 if guided else 1), "steps": jnp.minimum(i, steps)}
    return x


def expected_reveals(n_masked: int, steps: int, unmask_schedule: str = "linear") -> list[int]:
    """Tokens revealed per step by the confidence sampler (no threshold), for tests and docs."""
    frac = UNMASK_SCHEDULES[unmask_schedule]
    left = [n_masked] + [int(math.floor(n_masked * float(frac((j + 1) / steps)) + 1e-4)) for j in range(steps)]
    left[-1] = 0
    return [left[j] - left[j + 1] for j in range(steps)]


__all__ = ["sample_text", "process_log_probs", "gumbel_argmax", "ancestral_update", "expected_reveals",
           "UNMASK_SCHEDULES"]
