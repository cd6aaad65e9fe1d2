"""Text side of D-DiT: masked (absorbing-state) diffusion, MDLM "SUBS" form.

REFERENCE.md, Objectives. t in [eps, 1] is diffusion time; each token is
independently replaced by the mask id with probability move(t) ("mask
probability"); alpha(t) = 1 - move(t) = exp(-sigma(t)). The continuous-time
negative ELBO per token is

    E_t E_{x_t} [ w(t) * sum_{l masked} -log p(x0_l | x_t) ],
    w(t) = dsigma/dt / expm1(sigma) = move'(t) / move(t)

(loglinear: w = 1/t exactly). SUBS parameterisation: the mask logit is -inf
and unmasked positions copy their token, so they contribute zero loss.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp


def _loglinear(t, eps):
    return (1.0 - eps) * t, jnp.full_like(t, 1.0 - eps)


def _linear(t, eps):
    # sigma(t) linear in t, sigma(1) = -log(eps), so move(1) = 1 - eps as in loglinear.
    sigma_max = -math.log(eps)
    return -jnp.expm1(-sigma_max * t), sigma_max * jnp.exp(-sigma_max * t)


def _cosine(t, eps):
    # alpha(t) = eps + (1 - eps) cos(pi t / 2): slow masking early, fast late.
    half_pi = 0.5 * math.pi
    return (1.0 - eps) * (1.0 - jnp.cos(half_pi * t)), (1.0 - eps) * half_pi * jnp.sin(half_pi * t)


_SCHEDULES = {"loglinear": _loglinear, "linear": _linear, "cosine": _cosine}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Noise schedule of the absorbing process; hashable (usable as a static jit argument).

    kind: "loglinear" (default, the release's), "linear" (sigma linear in t) or "cosine".
    All functions take t (any shape, float32) and return the same shape.
    """

    kind: str = "loglinear"
    eps: float = 1e-3

    def __post_init__(self):
        if self.kind not in _SCHEDULES:
            raise ValueError(f"Schedule: kind={self.kind!r}; expected one of {sorted(_SCHEDULES)}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"Schedule: eps={self.eps}; expected 0 < eps < 1")

    def _move_dmove(self, t):
        return _SCHEDULES[self.kind](jnp.asarray(t, jnp.float32), self.eps)

    def move(self, t):
        """Mask probability at time t (loglinear: (1 - eps) t)."""
        return self._move_dmove(t)[0]

    def sigma(self, t):
        """Total noise: alpha(t) = exp(-sigma) (loglinear: -log(1 - (1 - eps) t))."""
        return -jnp.log1p(-self.move(t))

    def dsigma(self, t):
        """d sigma / dt = move'(t) / (1 - move(t)) (loglinear: (1 - eps) / (1 - (1 - eps) t))."""
        move, dmove = self._move_dmove(t)
        return dmove / (1.0 - move)

    def loss_weight(self, t):
        """w(t) = dsigma / expm1(sigma) (REFERENCE.md), = move'(t) / move(t)."""
        return self.dsigma(t) / jnp.expm1(self.sigma(t))

    def stay_masked_prob(self, t, s):
        """P(a token masked at time t is still masked at s < t) = move(s) / move(t)."""
        return self.move(s) / self.move(t)


def antithetic_times(rng: jax.Array, batch: int, eps: float = 1e-3) -> jax.Array:
    """t_B in [eps, 1): one shared uniform offset, one time in each of B equal strata.

    Lowers the variance of the batch loss versus i.i.d. times (MDLM).
    """
    u = jax.random.uniform(rng, (), jnp.float32)
    u_B = jnp.mod(u / batch + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
    return (1.0 - eps) * u_B + eps


def mask_tokens(rng: jax.Array, token_ids_BxL: jax.Array, t_B: jax.Array, mask_id: int,
                schedule: Schedule = Schedule(), maskable_BxL: jax.Array | None = None) -> jax.Array:
    """x_t: each maskable token becomes `mask_id` independently with probability move(t).

    Positions where `maskable_BxL` is False (e.g. the question in stage 3, or padding
    when it should not be trained on) are never masked.
    """
    B, L = token_ids_BxL.shape
    if t_B.shape != (B,):
        raise ValueError(f"mask_tokens: t_B {t_B.shape}; expected ({B},) for token_ids {token_ids_BxL.shape}")
    masked = jax.random.uniform(rng, (B, L), jnp.float32) < schedule.move(t_B)[:, None]
    if maskable_BxL is not None:
        masked &= maskable_BxL.astype(bool)
    return jnp.where(masked, jnp.asarray(mask_id, token_ids_BxL.dtype), token_ids_BxL)


def _subs_logsumexp(logits_BxLxV, mask_id):
    """logsumexp over the vocabulary without the mask column, float32 (B, L)."""
    is_mask = jnp.arange(logits_BxLxV.shape[-1]) == mask_id
    # The max is exact in the input dtype; the float32 cast sits inside the sum's reduction.
    peak = jnp.max(jnp.where(is_mask, -jnp.inf, logits_BxLxV), axis=-1, keepdims=True).astype(jnp.float32)
    total = jnp.sum(jnp.where(is_mask, 0.0, jnp.exp(logits_BxLxV.astype(jnp.float32) - peak)), axis=-1)
    return peak[..., 0] + jnp.log(total)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def subs_nll(logits_BxLxV: jax.Array, target_ids_BxL: jax.Array, mask_id: int) -> jax.Array:
    """-log p(x0 | x_t) under SUBS (mask logit -inf), float32 (B, L).

    Memory: the log-softmax is never materialised (logsumexp minus the target's logit),
    and the custom backward writes softmax - onehot straight into the logits' dtype in
    one elementwise pass, so at most one float32 (B, L, V) buffer exists (XLA:CPU keeps
    the cast logits for the two reductions; fusing backends keep none).
    """
    return _subs_nll_fwd(logits_BxLxV, target_ids_BxL, mask_id)[0]


def _subs_nll_fwd(logits_BxLxV, target_ids_BxL, mask_id):
    V = logits_BxLxV.shape[-1]
    if not 0 <= mask_id < V:
        raise ValueError(f"subs_nll: mask_id={mask_id} outside the vocabulary of size {V}")
    lse_BxL = _subs_logsumexp(logits_BxLxV, mask_id)
    target_ids_BxL = target_ids_BxL.astype(jnp.int32)
    target_logit = jnp.take_along_axis(logits_BxLxV, target_ids_BxL[..., None], axis=-1)[..., 0]
    return lse_BxL - target_logit.astype(jnp.float32), (logits_BxLxV, target_ids_BxL, lse_BxL)


def _subs_nll_bwd(mask_id, residuals, g_BxL):
    logits_BxLxV, target_ids_BxL, lse_BxL = residuals
    vocab = jnp.arange(logits_BxLxV.shape[-1])
    probs = jnp.where(vocab == mask_id, 0.0, jnp.exp(logits_BxLxV.astype(jnp.float32) - lse_BxL[..., None]))
    grad = g_BxL[..., None] * (probs - (vocab == target_ids_BxL[..., None]))
    return grad.astype(logits_BxLxV.dtype), None


subs_nll.defvjp(_subs_nll_fwd, _subs_nll_bwd)


NORMALIZATIONS = ("per_example", "batch_tokens")


def masked_diffusion_loss(logits_BxLxV: jax.Array, target_ids_BxL: jax.Array, noisy_ids_BxL: jax.Array,
                          t_B: jax.Array, mask_id: int, schedule: Schedule = Schedule(),
                          label_mask_BxL: jax.Array | None = None, count_padding: bool = True,
                          pad_mask_BxL: jax.Array | None = None, normalization: str = "per_example") -> jax.Array:
    """Per-example SUBS continuous-time loss, float32 (B,).

    loss_b = w(t_b) * sum_{l counted and masked} -log p(x0_l | x_t) / N_b,
    counted = label_mask (all if None) and, unless count_padding, not padding.

    normalization "per_example": N_b = number of counted positions of row b (masked
    or not; at least 1): every example weighs the same whatever its label count.
    Dividing by counted positions (not by masked ones) keeps the estimate an
    unbiased per-token ELBO: N_b does not depend on the random mask.
    normalization "batch_tokens": N_b = L, so mean_b(loss_b) = (summed weighted loss)
    / (B * L): the release's rule (`ignore_padding` false), where an example weighs in
    proportion to its label count. With every position counted the two agree.
    """
    B, L, _ = logits_BxLxV.shape
    for name, arr in (("target_ids", target_ids_BxL), ("noisy_ids", noisy_ids_BxL),
                      ("label_mask", label_mask_BxL), ("pad_mask", pad_mask_BxL)):
        if arr is not None and arr.shape != (B, L):
            raise ValueError(f"masked_diffusion_loss: {name} {arr.shape}; expected {(B, L)} from logits "
                             f"{logits_BxLxV.shape}")
    if not count_padding and pad_mask_BxL is None:
        raise ValueError("masked_diffusion_loss: count_padding=False needs pad_mask_BxL")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"masked_diffusion_loss: normalization={normalization!r}; expected one of {NORMALIZATIONS}")
    counted = jnp.ones((B, L), bool)
    if label_mask_BxL is not None:
        counted &= label_mask_BxL.astype(bool)
    if not count_padding:
        counted &= ~pad_mask_BxL.astype(bool)
    scored = counted & (noisy_ids_BxL == mask_id)
    nll = jnp.where(scored, subs_nll(logits_BxLxV, target_ids_BxL, mask_id), 0.0)
    if normalization == "batch_tokens":
        n_counted = jnp.float32(L)
    else:
        n_counted = jnp.maximum(jnp.sum(counted, axis=1), 1).astype(jnp.float32)
    return schedule.loss_weight(t_B) * jnp.sum(nll, axis=1) / n_counted


__all__ = ["NORMALIZATIONS", "Schedule", "antithetic_times", "mask_tokens", "subs_nll", "masked_diffusion_loss"]
