"""Text sampling for masked diffusion: ancestral, confidence-based, semi-autoregressive, threshold.

REFERENCE.md, Inference. All samplers share one loop (`lax.while_loop`, static
shapes): predict log p(x0 | x_t) for every position, update some masked
positions, repeat. Positions with `fixed=True` (a VQA prompt) keep their ids;
the others start masked and are the only ones ever written. The threshold
sampler (Fast-dLLM's parallel decoding) reveals as many tokens per call as are
confident, so a row needs far fewer network calls (README, Sampling).

Prediction caching: D-DiT's text network is time-agnostic (no timestep input for
text, the image is clean), so `logits_fn` is a function of the ids alone and its
output is reused (inside `lax.cond`) until some token changes. A `logits_fn` that
is not a pure function of the ids would be wrong to cache; none is in D-DiT.

Image K/V cache (`CachedLogits`): a cheaper, approximate call that reuses part of
an earlier full call (MM-DiT's image keys and values), refreshed on a schedule.

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

import dataclasses
import math
from typing import Any, Callable

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
METHODS = ("ancestral", "confidence", "semi_ar", "threshold")
BLOCK_METHODS = ("semi_ar", "threshold")  # free positions cut into num_blocks blocks


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


@dataclasses.dataclass(frozen=True)
class CachedLogits:
    """A network whose calls can reuse part of an earlier call: MM-DiT's image K/V during text decoding.

    full(ids_BxL) -> (logits (B, L, V), cache): the whole network, plus what later calls reuse.
    cached(ids_BxL, cache) -> logits: the cheaper call reusing `cache` (an approximation: the cache
      was computed with the text of the last full call).
    refresh_every: R; a prediction runs `full` on the first call, when R calls (R > 0; 0: never)
      have passed since the last full one, and when a row starts a new block (semi_ar, threshold);
      R = 1 is exactly the uncached sampler.
    """

    full: Callable[[jax.Array], tuple[jax.Array, Any]]
    cached: Callable[[jax.Array, Any], jax.Array]
    refresh_every: int = 0

    def __post_init__(self):
        if self.refresh_every < 0:
            raise ValueError(f"CachedLogits: refresh_every={self.refresh_every}; expected >= 0 (0: never)")


def sample_text(logits_fn: LogitsFn | CachedLogits, ids_BxL: jax.Array, fixed_BxL: jax.Array, rng: jax.Array, *,
                method: str = "ancestral", steps: int, mask_id: int, schedule: Schedule = Schedule(),
                t_min: float = 1e-5, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                eos_id: int | None = None, min_new_tokens: int = 0,
                uncond_logits_fn: LogitsFn | None = None, cfg_scale: float = 1.0,
                unmask_schedule: str = "linear", confidence: str = "prob", threshold: float = 0.9,
                factor: float | None = None, num_blocks: int = 4, early_stop: bool = True,
                return_stats: bool = False):
    """Fills the non-fixed positions of `ids_BxL`; returns int32 ids (B, L) [, stats].

    logits_fn(ids_BxL) -> logits (B, L, V): the network closure (T5 + MM-DiT + image), or a
      `CachedLogits` (the image K/V cache: cheaper calls that reuse the image's keys and values).
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
                   "cosine") over `steps`. confidence: "prob" (p of the candidate),
                   "margin" (p1 - p2) or "random" (uniform order: MDLM with a fixed
                   number per step).
      "semi_ar"    each row's free positions are cut into `num_blocks` contiguous
                   blocks, generated left to right, `steps // num_blocks` confidence
                   steps each (steps must be divisible by num_blocks).
      "threshold"  Fast-dLLM's parallel decoding, blocks as semi_ar: each step reveals,
                   in the row's first block that still has masked positions, every
                   candidate whose probability is >= `threshold`, and at least the most
                   probable one; with `factor` f, the n most probable where p_n >=
                   1 - f / (n + 1) (the factor rule) instead. A block may take at most
                   `steps // num_blocks` steps (its last one reveals the rest), so a row
                   makes at most `steps` predictions, usually far fewer.
    Options: temperature (0 = argmax candidates), top_k, top_p, EOS ban on the first
      `min_new_tokens` free positions (against empty answers), CFG over the image:
      `uncond_logits_fn(ids)` is the same network with the null image embedding, and
      log p = log p_u + cfg_scale (log p_c - log p_u) (two forward passes per
      prediction); early_stop ends the loop once no row has a masked position (each
      row is done when its own positions are filled).
    stats: {"nfe": predictions (network calls on the batch), "nfe_per_row": (B,) predictions
      made while each row still had masked positions, "full_passes": predictions that ran
      the whole network (= nfe without a cache), "forward_passes": network calls counting
      CFG's second one, "steps": loop steps}.
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
    if not 0.0 < threshold <= 1.0 or (factor is not None and factor <= 0):
        raise ValueError(f"sample_text: threshold={threshold}, factor={factor}; expected 0 < threshold <= 1 "
                         "and factor > 0 (or None)")
    if ids_BxL.shape != fixed_BxL.shape or ids_BxL.ndim != 2:
        raise ValueError(f"sample_text: ids {ids_BxL.shape} and fixed {fixed_BxL.shape} must both be (B, L)")
    n_segments = num_blocks if method in BLOCK_METHODS else 1
    if steps % n_segments:
        raise ValueError(f"sample_text: {method} needs steps ({steps}) divisible by num_blocks ({num_blocks})")
    seg_steps = steps // n_segments
    guided = uncond_logits_fn is not None and cfg_scale != 1.0
    cached = isinstance(logits_fn, CachedLogits)
    net = logits_fn if cached else CachedLogits(lambda x: (logits_fn(x), ()), lambda x, cache: logits_fn(x), 1)

    fixed = fixed_BxL.astype(bool)
    free = ~fixed
    x0 = jnp.where(fixed, ids_BxL, mask_id).astype(jnp.int32)
    gen_index = jnp.cumsum(free, axis=1) - 1  # rank of each free position in its row
    n_free = jnp.maximum(jnp.sum(free, axis=1, keepdims=True), 1)
    block_id = jnp.where(free, gen_index * n_segments // n_free, n_segments)
    suppress_eos = free & (gen_index < min_new_tokens)
    ts = jnp.linspace(1.0, t_min, steps + 1, dtype=jnp.float32)
    frac_left = UNMASK_SCHEDULES[unmask_schedule]

    def masked(x):
        return (x == mask_id) & free

    def log_probs(logits, x):
        lu = uncond_logits_fn(x) if guided else None
        return process_log_probs(logits, mask_id, uncond_logits_BxLxV=lu, cfg_scale=cfg_scale,
                                 suppress_eos_BxL=suppress_eos, eos_id=eos_id, temperature=temperature,
                                 top_k=top_k, top_p=top_p)

    def predict_full(x, cache):
        logits, cache = net.full(x)
        return log_probs(logits, x), cache

    def predict_cached(x, cache):
        return log_probs(net.cached(x, cache), x), cache

    def current_block(i, x):
        """(B,) the block each row decodes now: its first with a masked position (threshold), the
        step's segment (semi_ar), 0 (one block)."""
        if method == "threshold":
            return jnp.min(jnp.where(masked(x), block_id, n_segments), axis=1)
        return jnp.full((x.shape[0],), jnp.minimum(i // seg_steps, n_segments - 1), jnp.int32)

    def candidates(rng, lp):
        return jnp.argmax(lp, axis=-1).astype(jnp.int32) if temperature == 0 else gumbel_argmax(rng, lp)

    def candidate_prob(lp, cand):
        return jnp.exp(jnp.take_along_axis(lp, cand[..., None], axis=-1)[..., 0])

    def ancestral_step(i, x, lp, aux, rng):
        stay = schedule.stay_masked_prob(ts[i], ts[i + 1])
        return ancestral_update(rng, x, lp, free, stay, mask_id, greedy=temperature == 0), aux

    def confidence_step(i, x, lp, aux, rng):
        rng_tok, rng_conf = row_keys.split(rng)
        seg, j = i // seg_steps, i % seg_steps
        eligible = masked(x) & ((block_id == seg) if method == "semi_ar" else True)
        n_now = jnp.sum(eligible, axis=1)
        n0 = jnp.where(j == 0, n_now, aux[0])  # masked count at the segment's start
        cand = candidates(rng_tok, lp)
        if confidence == "prob":
            score = candidate_prob(lp, cand)
        elif confidence == "margin":
            top2 = jnp.exp(jax.lax.top_k(lp, 2)[0])
            score = top2[..., 0] - top2[..., 1]
        else:
            score = row_keys.draw(rng_conf, jax.random.uniform, x.shape)
        left_after = jnp.floor(n0 * frac_left((j + 1) / seg_steps) + 1e-4).astype(jnp.int32)
        k = jnp.maximum(n_now - jnp.where(j == seg_steps - 1, 0, left_after), 0)
        reveal = eligible & (_ranks(jnp.where(eligible, score, -jnp.inf)) < k[:, None])
        return jnp.where(reveal, cand, x), (n0, aux[1])

    def threshold_step(i, x, lp, aux, rng):
        block = current_block(i, x)
        j = jnp.where(block != aux[0], 0, aux[1] + 1)  # steps this row has spent in its block
        eligible = masked(x) & (block_id == block[:, None])
        cand = candidates(rng, lp)
        prob = candidate_prob(lp, cand)
        rank = _ranks(jnp.where(eligible, prob, -jnp.inf))
        sure = prob >= (threshold if factor is None else 1.0 - factor / (rank + 2.0))
        reveal = eligible & (sure | (rank == 0) | (j == seg_steps - 1)[:, None])
        return jnp.where(reveal, cand, x), (block, j)

    step = {"ancestral": ancestral_step, "threshold": threshold_step}.get(method, confidence_step)
    B = x0.shape[0]

    def cond(state):
        # Iterations 0..steps-1 are sampling steps; iteration `steps` is the release's final
        # argmax ("noise removal"), run only if something is still masked. Keeping it in the
        # loop means the network appears once in the compiled program.
        i, x = state["i"], state["x"]
        left = jnp.any(masked(x))
        return ((i < steps) & (left if early_stop else True)) | ((i == steps) & left)

    def fill(i, x, lp, aux, rng):
        return jnp.where(masked(x), jnp.argmax(lp, axis=-1).astype(jnp.int32), x), aux

    def body(state):
        i, x = state["i"], state["x"]
        # Prediction caching: lp is reused while no token changed; else the network runs, in full
        # when the cache is due for a refresh (CachedLogits), else reusing it.
        block = current_block(i, x)
        due = ((state["since_full"] < 0) | jnp.any(block != state["cache_block"])
               | ((net.refresh_every > 0) & (state["since_full"] >= net.refresh_every)))
        need, refresh = ~state["valid"], ~state["valid"] & due
        # Without a cache the network must appear once in the program: no inner cond.
        predict = (lambda: jax.lax.cond(refresh, predict_full, predict_cached, x, state["cache"])) if cached \
            else (lambda: predict_full(x, state["cache"]))
        lp, cache = jax.lax.cond(need, predict, lambda: (state["lp"], state["cache"]))
        key, sub = row_keys.split(state["key"])
        x_new, aux = jax.lax.cond(i < steps, step, fill, i, x, lp, state["aux"], sub)
        stats = state["stats"]
        stats = dict(nfe=stats["nfe"] + need, full=stats["full"] + refresh,
                     per_row=stats["per_row"] + (need & jnp.any(masked(x), axis=1)))
        return dict(i=i + 1, x=x_new, lp=lp, valid=~jnp.any(x_new != x), aux=aux, key=key, stats=stats,
                    cache=cache, cache_block=jnp.where(refresh, block, state["cache_block"]),
                    since_full=jnp.where(refresh, 1, state["since_full"] + need))

    # Abstract traces only: no second copy of the network in the program.
    lp_shape, cache_shape = jax.eval_shape(lambda x: predict_full(x, None), x0)
    zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)  # noqa: E731
    row = jnp.zeros((B,), jnp.int32)
    state = dict(i=jnp.int32(0), x=x0, lp=zeros(lp_shape), valid=jnp.bool_(False), aux=(row - 1, row),
                 key=rng, cache=zeros(cache_shape), cache_block=row - 1, since_full=jnp.int32(-1),
                 stats=dict(nfe=jnp.int32(0), full=jnp.int32(0), per_row=row))
    state = jax.lax.while_loop(cond, body, state)
    if return_stats:
        st = state["stats"]
        return state["x"], {"nfe": st["nfe"], "nfe_per_row": st["per_row"], "full_passes": st["full"],
                            "forward_passes": st["nfe"] * (2 if guided else 1),
                            "steps": jnp.minimum(state["i"], steps)}
    return state["x"]


def expected_reveals(n_masked: int, steps: int, unmask_schedule: str = "linear") -> list[int]:
    """Tokens revealed per step by the confidence sampler (no threshold), for tests and docs."""
    frac = UNMASK_SCHEDULES[unmask_schedule]
    left = [n_masked] + [int(math.floor(n_masked * float(frac((j + 1) / steps)) + 1e-4)) for j in range(steps)]
    left[-1] = 0
    return [left[j] - left[j + 1] for j in range(steps)]


__all__ = ["sample_text", "CachedLogits", "process_log_probs", "gumbel_argmax", "ancestral_update", "expected_reveals",
           "UNMASK_SCHEDULES"]
