"""The jitted train step: sharding equivalence, microbatching, frozen T5 rows, non-finite skips."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import EOS_ID, MASK_ID, tiny_batch, tiny_model_config

from dual_diffusion.sharding import DEFAULT_RULES, batch_sharding, make_mesh
from dual_diffusion.training.loss import LossConfig
from dual_diffusion.training.state import make_plan
from dual_diffusion.training.step import loss_and_grads, make_train_step

LOSS = LossConfig(mask_id=MASK_ID, null_id=EOS_ID, lambda_text=0.5)
BATCH = 8


def _setup(mesh_shape, microbatches=1, config=None):
    n = int(np.prod(mesh_shape))
    mesh = make_mesh(*mesh_shape, devices=jax.devices()[:n])
    plan = make_plan(config or tiny_model_config(), mesh, DEFAULT_RULES, MASK_ID)
    batch = tiny_batch(BATCH)
    shardings = jax.tree.map(lambda x: batch_sharding(mesh, DEFAULT_RULES, x.ndim), batch)
    step = make_train_step(plan, LOSS, shardings, microbatches=microbatches, ema_decay=0.9)
    return plan, step, batch


def _run(mesh_shape, steps=3):
    plan, step, batch = _setup(mesh_shape)
    state, frozen = plan.init_fn()
    losses = []
    for i in range(steps):
        state, m = step(state, frozen, tiny_batch(BATCH, seed=i))
        losses.append(float(m["loss"]))
    return plan, state, np.array(losses)


@pytest.fixture(scope="module")
def single():
    return _setup((1, 1, 1))


def test_only_mask_row_of_t5_trains_and_ema_follows(single):
    plan, step, batch = single
    state, frozen = plan.init_fn()
    emb0 = np.asarray(state["params"]["text_encoder"]["embedding"])
    mm0 = jax.tree.map(np.asarray, state["params"]["transformer"])
    for i in range(2):
        state, m = step(state, frozen, tiny_batch(BATCH, seed=i))
        assert np.isfinite(float(m["loss"])) and bool(m["finite"])
    emb1 = np.asarray(state["params"]["text_encoder"]["embedding"])
    assert list(np.nonzero(np.abs(emb1 - emb0).sum(1))[0]) == [MASK_ID]
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"]["transformer"], mm0)
    assert max(jax.tree.leaves(moved)) > 0
    assert int(state["step"]) == 2 and int(state["nonfinite"]) == 0
    # EMA (decay 0.9) lies strictly between the init and the params after two updates.
    e, p = np.asarray(state["ema"]["text_encoder"]["embedding"][MASK_ID]), emb1[MASK_ID]
    assert 0 < np.abs(e - emb0[MASK_ID]).max() < np.abs(p - emb0[MASK_ID]).max()


def test_nonfinite_loss_skips_update(single):
    plan, step, _ = single
    state, frozen = plan.init_fn()
    before = jax.tree.map(np.asarray, state["params"])
    bad = tiny_batch(BATCH)
    bad["t2i"]["image"][0, 0, 0, 0] = np.nan
    state, m = step(state, frozen, bad)
    assert not bool(m["finite"])
    assert int(state["nonfinite"]) == 1 and int(state["step"]) == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["params"], before)


@pytest.mark.slow
def test_microbatches_give_the_full_batch_gradient():
    plan, _, batch = _setup((1, 1, 1))
    state, frozen = plan.init_fn()
    rng = jax.random.key(3)
    run = lambda n: jax.jit(lambda p, b: loss_and_grads(plan, LOSS, p, frozen, b, rng, n, 0.0, 1.0))(
        state["params"], batch)
    m1, g1 = run(1)
    m2, g2 = run(2)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sharded_steps_match_one_device():
    _, _, ref = _run((1, 1, 1))
    for shape in ((2, 4, 1), (2, 2, 2)):
        plan, state, losses = _run(shape)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f"mesh {shape}")
        specs = [s.spec for s in jax.tree.leaves(plan.state_shardings["params"])]
        assert any("fsdp" in str(s) for s in specs), f"no parameter sharded over fsdp on mesh {shape}"
        if shape[2] > 1:
            assert any("tensor" in str(s) for s in specs), "no parameter sharded over tensor"
        kernel = state["params"]["transformer"]["blocks"][0]["img_mlp"]["fc1"]["kernel"]
        assert len(kernel.sharding.device_set) == 8
        assert kernel.addressable_shards[0].data.size < kernel.size  # really split, not replicated


def test_loss_spike_guard_skips_an_outlier_update_only_when_enabled(single):
    from dual_diffusion.training.plan_io import with_loss_window

    plan0, plain_step, _ = single
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    plan = with_loss_window(make_plan(tiny_model_config(), mesh, DEFAULT_RULES, MASK_ID), window=2)
    shardings = jax.tree.map(lambda x: batch_sharding(mesh, DEFAULT_RULES, x.ndim), tiny_batch(BATCH))
    step = make_train_step(plan, LOSS, shardings, ema_decay=0.9, loss_spike_factor=3.0)
    spiky = tiny_batch(BATCH, seed=9)
    for half in ("t2i", "i2t"):
        spiky[half]["image"] = spiky[half]["image"] * 100.0  # a finite loss far above the usual ~1-5

    state, frozen = plan.init_fn()
    assert np.isnan(np.asarray(state["loss_window"])).all()
    losses = []
    for i in range(2):  # fill the window: the guard is idle until then
        state, m = step(state, frozen, tiny_batch(BATCH, seed=i))
        losses.append(float(m["loss"]))
        assert not bool(m["spike"])
    np.testing.assert_allclose(np.asarray(state["loss_window"]), losses, rtol=1e-6)
    before = jax.tree.map(np.asarray, state["params"])
    state, m = step(state, frozen, spiky)
    assert bool(m["finite"]) and bool(m["spike"]) and float(m["loss"]) > 3.0 * np.median(losses)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state["params"], before)
    np.testing.assert_allclose(np.asarray(state["loss_window"]), losses, rtol=1e-6)  # not recorded
    assert int(state["step"]) == 3 and int(state["nonfinite"]) == 0
    state, m = step(state, frozen, tiny_batch(BATCH, seed=5))  # an ordinary batch is applied again
    assert not bool(m["spike"])
    assert np.asarray(state["loss_window"])[-1] == np.float32(m["loss"])

    # Off (the default): the same outlier batch moves the weights, and the state has no window.
    state0, frozen0 = plan0.init_fn()
    assert "loss_window" not in state0
    state0, _ = plain_step(state0, frozen0, tiny_batch(BATCH))  # past the lr-0 warmup step
    before0 = jax.tree.map(np.asarray, state0["params"])
    state0, m0 = plain_step(state0, frozen0, spiky)
    assert "spike" not in m0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state0["params"], before0)
    assert max(jax.tree.leaves(moved)) > 0
