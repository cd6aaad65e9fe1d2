"""Masked-diffusion samplers: oracle networks, in-filling, schedules, statistics, precision."""
import functools

import dual_diffusion  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dual_diffusion.diffusion.text_sampling import (ancestral_update, expected_reveals, gumbel_argmax,
                                                    process_log_probs, sample_text)

V, MASK, EOS = 9, 8, 1
B, L = 3, 12
TARGET = jax.random.randint(jax.random.key(0), (B, L), 2, MASK)
FIXED = jnp.broadcast_to(jnp.arange(L) < 4, (B, L))  # a 4-token "prompt"
PROMPT_IDS = jnp.where(FIXED, 0, MASK)  # prompt ids (0) differ from the oracle's target

CONFIGS = {
    "ancestral": dict(method="ancestral"),
    "ancestral_greedy": dict(method="ancestral", temperature=0.0),
    "confidence": dict(method="confidence"),
    "confidence_cosine_margin": dict(method="confidence", unmask_schedule="cosine", confidence="margin"),
    "confidence_random": dict(method="confidence", confidence="random"),
    "threshold": dict(method="threshold", threshold=0.9, num_blocks=2),
    "semi_ar": dict(method="semi_ar", num_blocks=2),
    "topk_topp": dict(method="confidence", top_k=2, top_p=0.9, temperature=0.7),
}


def chi2_sf(chi2, dof):
    """P(X > chi2) for X ~ chi-square(dof) (scipy-free: the regularised upper gamma)."""
    return float(jax.scipy.special.gammaincc(dof / 2.0, chi2 / 2.0))


def chi2_gof_pvalue(counts, expected):
    return chi2_sf(float(np.sum((counts - expected) ** 2 / expected)), counts.size - 1)


def oracle(ids):
    """A perfect denoiser: p(x0 | x_t) puts (almost) all mass on the target."""
    return 30.0 * jax.nn.one_hot(TARGET[: ids.shape[0]], V)


@functools.lru_cache(maxsize=None)
def _compiled(fn, steps, kw_items):
    """One jitted sampler per (network, options): tests reuse it across seeds and inputs."""
    return jax.jit(functools.partial(sample_text, fn, steps=steps, mask_id=MASK, return_stats=True,
                                     **dict(kw_items)))


def _run(fn, ids=PROMPT_IDS, fixed=FIXED, seed=0, steps=8, **kw):
    return _compiled(fn, steps, tuple(sorted(kw.items())))(ids, fixed, jax.random.key(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_oracle_recovers_target_and_prompt_is_fixed(name):
    out, st = _run(oracle, **CONFIGS[name])
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:, :4], 0)  # prompt unchanged
    np.testing.assert_array_equal(out[:, 4:], np.asarray(TARGET)[:, 4:])
    assert 1 <= int(st["nfe"]) <= 9 and int(st["steps"]) <= 8
    if name == "threshold":  # everything is confident: one step per block
        assert int(st["steps"]) == 2 and int(st["nfe"]) == 2


def _random_logits_fn(ids):
    """A deterministic but input-dependent random network."""
    key = jax.random.fold_in(jax.random.key(42), jnp.sum(ids * jnp.arange(ids.shape[1])))
    return 2.0 * jax.random.normal(key, ids.shape + (V,))


@pytest.mark.parametrize("method", ["ancestral", "confidence", "semi_ar"])
def test_fixed_tokens_never_change_and_seed_determinism(method):
    ids = jnp.where(FIXED, jnp.arange(L) % 5 + 2, MASK)
    a, _ = _run(_random_logits_fn, ids=ids, method=method, num_blocks=2, seed=3)
    b, _ = _run(_random_logits_fn, ids=ids, method=method, num_blocks=2, seed=3)
    c, _ = _run(_random_logits_fn, ids=ids, method=method, num_blocks=2, seed=4)
    a = np.asarray(a)
    np.testing.assert_array_equal(a, np.asarray(b))
    assert not np.array_equal(a, np.asarray(c))
    np.testing.assert_array_equal(a[np.asarray(FIXED)], np.asarray(ids)[np.asarray(FIXED)])
    assert not (a == MASK).any()


def _masked_counts(fn, **kw):
    """Masked-token count (row 0) of every input the network sees, in order."""
    counts = []

    def spy(ids):
        jax.debug.callback(lambda x: counts.append(int((np.asarray(x)[0] == MASK).sum())), ids, ordered=True)
        return fn(ids)

    out, _ = _run(spy, **kw)
    jax.block_until_ready(out)
    return counts


@pytest.mark.parametrize("sched,expected", [("linear", [2, 2, 1, 2, 1]), ("cosine", [1, 1, 2, 2, 2])])
def test_confidence_reveals_follow_schedule(sched, expected):
    """8 masked tokens, 5 steps: remaining after step j = floor(8 frac((j+1)/5)), frac = 1-tau or cos."""
    assert expected_reveals(8, 5, sched) == expected
    counts = _masked_counts(oracle, method="confidence", unmask_schedule=sched, steps=5)
    # The network sees the input before every step (each step changes something here);
    # the last step's reveals are not seen by the network.
    assert counts[0] == 8 and len(counts) == 5
    assert [a - b for a, b in zip(counts, counts[1:])] == expected[:-1]
    assert counts[-1] == expected[-1]


def test_semi_ar_goes_block_by_block():
    seen = []

    def spy(ids):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)[0].copy()), ids, ordered=True)
        return oracle(ids)

    out, _ = _run(spy, method="semi_ar", num_blocks=2, steps=8)
    jax.block_until_ready(out)
    first, second = slice(4, 8), slice(8, 12)  # the 8 free positions in two blocks of 4
    for x in seen:
        if (x[second] != MASK).any():
            assert not (x[first] == MASK).any(), f"block 2 started before block 1 finished: {x}"
    assert len(seen) >= 4


def test_ancestral_reveal_rate_matches_schedule():
    """One step t -> s reveals each masked token with probability 1 - s/t (5-sigma bound)."""
    n = 200_000
    x = jnp.full((1, n), MASK)
    lp = jax.nn.log_softmax(jnp.zeros((1, n, V)).at[..., MASK].set(-jnp.inf))
    for t, s in ((1.0, 0.75), (0.3, 0.29), (0.05, 1e-5)):
        new = ancestral_update(jax.random.key(1), x, lp, jnp.ones((1, n), bool), s / t, MASK)
        rate = float(jnp.mean(new != MASK))
        p = 1 - s / t
        assert abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9, (t, s, rate, p)


# ----------------------------------------------------------------- the release's rule in NumPy
VS, LS = 4, 4  # tokens 0..2 and mask 3
BASE = np.random.RandomState(0).normal(size=(LS, VS)) * 1.2


def _chain_logits_np(x):
    """Position l prefers the token at l-1 (when revealed): reveal order matters."""
    lg = np.broadcast_to(BASE, x.shape + (VS,)).copy()
    prev = np.concatenate([np.full((x.shape[0], 1), 3), x[:, :-1]], 1)
    lg += 2.0 * (prev[..., None] == np.arange(VS))
    return lg


def _chain_logits_jnp(x):
    prev = jnp.concatenate([jnp.full((x.shape[0], 1), 3), x[:, :-1]], 1)
    return jnp.asarray(BASE, jnp.float32) + 2.0 * (prev[..., None] == jnp.arange(VS))


def _numpy_ancestral(n, steps, t_min, rng):
    """Straight from REFERENCE.md / torch_anchor.py: q = p (t - s), q[mask] = s; final argmax."""
    x = np.full((n, LS), 3)
    ts = np.linspace(1, t_min, steps + 1)
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        lg = _chain_logits_np(x)
        lg[..., 3] = -np.inf
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        q = p * (t - s)
        q[..., 3] = s
        q /= q.sum(-1, keepdims=True)
        draw = (np.cumsum(q, -1) < rng.random((n, LS, 1))).sum(-1).clip(max=3)  # inverse CDF
        x = np.where(x == 3, draw, x)
    lg = _chain_logits_np(x)
    lg[..., 3] = -np.inf
    return np.where(x == 3, lg.argmax(-1), x)


@pytest.mark.parametrize("t_min", [1e-5, 0.3])
def test_ancestral_matches_numpy_release_rule_in_distribution(t_min):
    """Two-sample chi-square over the 81 possible sequences; fails if p < 1e-3 (fixed seeds)."""
    n, steps = 20000, 4
    ours = sample_text(_chain_logits_jnp, jnp.full((n, LS), 3), jnp.zeros((n, LS), bool), jax.random.key(0),
                       method="ancestral", steps=steps, mask_id=3, t_min=t_min)
    ref = _numpy_ancestral(n, steps, t_min, np.random.default_rng(0))
    code = lambda a: (np.asarray(a) * 3 ** np.arange(LS)).sum(1)  # noqa: E731
    a, b = np.bincount(code(ours), minlength=81), np.bincount(code(ref), minlength=81)
    cells = (a + b) > 0
    chi2 = np.sum((a - b)[cells] ** 2 / (a + b)[cells])
    p_value = chi2_sf(chi2, int(cells.sum()) - 1)
    assert p_value > 1e-3, (chi2, cells.sum(), p_value)


# ----------------------------------------------------------------- categorical precision
@pytest.mark.parametrize("probs", [
    np.array([0.97, 0.015, 0.01, 0.004, 0.001]),  # peaked
    np.full(50, 1 / 50),  # flat
    np.r_[0.5, np.full(500, 0.5 / 500)],  # long flat tail
])
def test_gumbel_draws_match_p(probs):
    """Chi-square goodness of fit (p > 1e-3, fixed seed) and every cell within 5 sigma."""
    n = 100_000 if probs.size < 100 else 40_000
    lp = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, probs.size))
    draws = np.asarray(jax.jit(gumbel_argmax)(jax.random.key(11), lp))
    counts = np.bincount(draws, minlength=probs.size)
    expected = n * probs
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - probs)) + 1)
    if probs.size < 100:
        assert chi2_gof_pvalue(counts, expected) > 1e-3
    else:  # group the tail into 20 bins so every cell has a large expected count
        grouped = np.r_[counts[0], counts[1:].reshape(20, -1).sum(1)]  # 25 tokens per bin
        assert chi2_gof_pvalue(grouped, np.r_[expected[0], expected[1:].reshape(20, -1).sum(1)]) > 1e-3


def test_process_log_probs_options():
    logits = jnp.log(jnp.array([[[0.4, 0.3, 0.2, 0.1, 0.0]]]) + 1e-30)  # last column is the mask
    p = np.exp(np.asarray(process_log_probs(logits, 4, top_p=0.5)))[0, 0]
    np.testing.assert_allclose(p, [4 / 7, 3 / 7, 0, 0, 0], atol=1e-6)
    p = np.exp(np.asarray(process_log_probs(logits, 4, top_k=3)))[0, 0]
    np.testing.assert_allclose(p, [4 / 9, 3 / 9, 2 / 9, 0, 0], atol=1e-6)
    p = np.exp(np.asarray(process_log_probs(logits, 4, temperature=0.5)))[0, 0]
    np.testing.assert_allclose(p, np.r_[[0.16, 0.09, 0.04, 0.01] / np.float64(0.3), 0], atol=1e-6)
    p = np.exp(np.asarray(process_log_probs(logits, 4, suppress_eos_BxL=jnp.ones((1, 1), bool), eos_id=0)))
    np.testing.assert_allclose(p[0, 0], [0, 0.5, 1 / 3, 1 / 6, 0], atol=1e-6)
    # CFG in log space: w = 1 is the conditional, w = 0 the unconditional, else lu + w (lc - lu).
    lc, lu = jax.random.normal(jax.random.key(0), (2, 1, 3, 5))
    for w in (0.0, 1.0, 2.5):
        got = process_log_probs(lc, 4, uncond_logits_BxLxV=lu, cfg_scale=w)
        a, b = jax.nn.log_softmax(lc[..., :4]), jax.nn.log_softmax(lu[..., :4])
        np.testing.assert_allclose(got[..., :4], jax.nn.log_softmax(b + w * (a - b)), atol=1e-5)
        assert np.all(np.isneginf(np.asarray(got[..., 4])))


@pytest.mark.parametrize("method", ["ancestral", "confidence", "semi_ar"])
def test_eos_suppressed_until_min_length(method):
    def eos_lover(ids):  # EOS first, the target second: without suppression answers are empty
        return 10.0 * jax.nn.one_hot(jnp.full(ids.shape, EOS), V) + 5.0 * jax.nn.one_hot(TARGET, V)

    out, _ = _run(eos_lover, method=method, num_blocks=2, eos_id=EOS, min_new_tokens=3, temperature=0.0)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:, 4:7], np.asarray(TARGET)[:, 4:7])
    np.testing.assert_array_equal(out[:, 7:], EOS)


def test_text_cfg_over_image():
    # Conditional mildly prefers token 3 over 2; unconditional strongly prefers 2.
    cond_fn = lambda ids: jnp.zeros(ids.shape + (V,)).at[..., 2].set(1.0).at[..., 3].set(1.5)  # noqa: E731
    uncond_fn = lambda ids: jnp.zeros(ids.shape + (V,)).at[..., 2].set(3.0)  # noqa: E731
    out1, st1 = _run(cond_fn, method="confidence", temperature=0.0)
    out3, st3 = _run(cond_fn, method="confidence", temperature=0.0, uncond_logits_fn=uncond_fn, cfg_scale=3.0)
    assert np.all(np.asarray(out1)[:, 4:] == 3) and np.all(np.asarray(out3)[:, 4:] == 3)
    out0, _ = _run(cond_fn, method="confidence", temperature=0.0, uncond_logits_fn=uncond_fn, cfg_scale=0.0)
    assert np.all(np.asarray(out0)[:, 4:] == 2)
    assert int(st3["forward_passes"]) == 2 * int(st3["nfe"]) and int(st1["forward_passes"]) == int(st1["nfe"])


@pytest.mark.parametrize("method", ["ancestral", "confidence"])
def test_jit_with_sharded_batch(method):
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    n = 8
    tgt = jax.random.randint(jax.random.key(5), (n, L), 2, MASK)
    fn = lambda ids: _random_logits_fn(ids) + 3.0 * jax.nn.one_hot(tgt, V)  # noqa: E731
    ids, fixed = jnp.where(FIXED[:1], 0, MASK).repeat(n, 0), FIXED[:1].repeat(n, 0)
    sh = NamedSharding(mesh, P("data"))
    a, _ = _run(fn, ids=jax.device_put(ids, sh), fixed=jax.device_put(fixed, sh), method=method, seed=1)
    b, _ = _run(fn, ids=ids, fixed=fixed, method=method, seed=1)
    np.testing.assert_array_equal(a, b)


def test_network_is_compiled_into_the_loop_once():
    """One abstract trace (shapes) plus one in the loop body: the final argmax reuses it."""
    traces = []

    def counting(ids):
        traces.append(1)
        return oracle(ids)

    jax.jit(functools.partial(sample_text, counting, steps=4, mask_id=MASK)).lower(
        PROMPT_IDS, FIXED, jax.random.key(0))
    assert len(traces) == 2


# ----------------------------------------------------------------- threshold sampler, image cache
def _fixed_confidence_net(probs_BxL):
    """Position l predicts TARGET[l] with probability probs[l] (the rest spread evenly), whatever the ids."""
    p = jnp.asarray(probs_BxL, jnp.float32)[..., None]
    onehot = jax.nn.one_hot(TARGET, V)
    return lambda ids: jnp.log(onehot * p + (1 - onehot) * (1 - p) / (V - 2) + 1e-30)  # mask column: SUBS


def _reveal_steps(fn, **kw):
    """Row 0's positions in the order the sampler reveals them: one set per network call."""
    seen = []

    def spy(ids):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)[0] != MASK), ids, ordered=True)
        return fn(ids)

    out, st = _run(spy, temperature=0.0, **kw)
    jax.block_until_ready(out)
    seen.append(np.asarray(out)[0] != MASK)
    return [set(np.flatnonzero(b & ~a)) for a, b in zip(seen, seen[1:])], out, st


def test_threshold_reveals_every_sure_token_of_the_block_and_at_least_one():
    """Free positions 4..11 in 2 blocks: 4-7 and 8-11. Block 1 has two sure tokens (6, 7: p >= 0.9) and 4 is
    the most probable of the rest; block 2 nothing sure; position 9 leads there."""
    probs = np.broadcast_to(0.3 - 0.01 * np.arange(L), (B, L)).copy()  # no ties: earlier is more probable
    probs[:, [6, 7]] = [0.97, 0.93]
    probs[:, 5], probs[:, 9] = 0.5, 0.6
    steps, out, st = _reveal_steps(_fixed_confidence_net(probs), method="threshold", threshold=0.9, num_blocks=2,
                                   steps=8)
    assert steps[0] == {6, 7}  # every sure one of block 1, nothing of block 2
    assert steps[1] == {5} and steps[2] == {4}  # then one per call, most probable first
    assert steps[3] == {9} and steps[4:] == [{8}, {10}, {11}]  # block 2 only after block 1 is done
    np.testing.assert_array_equal(np.asarray(out)[:, 4:], np.asarray(TARGET)[:, 4:])
    assert int(st["nfe"]) == 7 and np.asarray(st["nfe_per_row"]).tolist() == [7] * B


def test_threshold_block_budget_and_factor_rule():
    probs = np.broadcast_to(0.3 - 0.01 * np.arange(L), (B, L)).copy()
    # steps // num_blocks = 2 calls per block: the second one reveals what the block still has.
    steps, _, st = _reveal_steps(_fixed_confidence_net(probs), method="threshold", num_blocks=2, steps=4)
    assert steps == [{4}, {5, 6, 7}, {8}, {9, 10, 11}] and int(st["nfe"]) == 4
    # Factor rule with f = 1: the n-th most probable is revealed while p_n >= 1 - f / (n + 1):
    # 0.96 (n=1: >= 0.5), 0.74 (n=2: >= 0.667), 0.7 < 0.75 (n=3) stops.
    probs[:, 4:8] = [0.7, 0.96, 0.74, 0.3]
    steps, _, _ = _reveal_steps(_fixed_confidence_net(probs), method="threshold", factor=1.0, num_blocks=2,
                                steps=8)
    assert steps[0] == {5, 6}


def test_rows_finish_on_their_own_and_the_loop_ends_with_the_last():
    """A sure row decodes each block in one call; an unsure row one token per call: nfe per row differs,
    and the loop makes as many calls as the slowest row needs."""
    probs = np.full((B, L), 0.99)
    probs[1] = 0.3 - 0.01 * np.arange(L)
    _, out, st = _reveal_steps(_fixed_confidence_net(probs), method="threshold", num_blocks=2, steps=8)
    assert np.asarray(st["nfe_per_row"]).tolist() == [2, 8, 2] and int(st["nfe"]) == 8
    np.testing.assert_array_equal(np.asarray(out)[:, 4:], np.asarray(TARGET)[:, 4:])


def _cached_pair(fn, drift=0.5):
    """A CachedLogits whose cached calls differ from full ones (the approximation made visible): the cache is
    the ids of the last full call, and a cached call shifts the logits by how far the ids moved since."""
    from dual_diffusion.diffusion.text_sampling import CachedLogits

    def cached(ids, seen):
        return fn(ids) + drift * jnp.sum(ids != seen, axis=1)[:, None, None] * jax.nn.one_hot(2, V)

    return lambda R: CachedLogits(lambda ids: (fn(ids), ids), cached, R)


def _neighbour_logits_fn(ids):
    """Cheap and input-dependent: a fixed random table plus a pull towards the left neighbour's token."""
    table = jax.random.normal(jax.random.key(9), (L, V))
    return table + 1.5 * jax.nn.one_hot(jnp.roll(ids, 1, axis=1), V)


def test_cache_refreshed_every_call_is_the_uncached_sampler():
    ids = jnp.where(FIXED, jnp.arange(L) % 5 + 2, MASK)
    net = _cached_pair(_neighbour_logits_fn, drift=3.0)
    kw = dict(ids=ids, method="threshold", num_blocks=2, seed=3, threshold=0.5)
    plain, st_plain = _run(_neighbour_logits_fn, **kw)
    every, st_every = _run(net(1), **kw)
    np.testing.assert_array_equal(np.asarray(every), np.asarray(plain))
    assert int(st_every["full_passes"]) == int(st_every["nfe"]) == int(st_plain["nfe"])
    never, st_never = _run(net(0), **kw)
    # Full passes only when some row starts a block (rows enter block 2 at their own time).
    assert 2 <= int(st_never["full_passes"]) <= 1 + B < int(st_never["nfe"])
    assert not np.array_equal(np.asarray(never), np.asarray(plain))  # the drift shows: cached calls ran
