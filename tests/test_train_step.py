"""The jitted train step: sharding equivalence, microbatching, T5's mask row, non-finite skips."""
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


def _reference_step(plan, loss_cfg):
    """The step as it was before the mask row was a parameter of its own: T5's whole table trains behind an
    update mask (its gradient and update multiplied by the one-hot mask row), captions through a
    stop_gradient T5, T5 called once per half. Kept here to prove the new layout changes no result."""
    import optax
    from flax import nnx
    from flax.nnx import traversals

    from dual_diffusion.training.loss import Networks, combine, corrupt, per_example_losses

    def networks(params, frozen):
        flat = lambda tree: traversals.flatten_mapping(tree or {})  # noqa: E731
        merge = lambda name: nnx.merge(plan.split.graphdefs[name], traversals.unflatten_mapping(  # noqa: E731
            {**flat(frozen[name]), **flat(params.get(name))}))
        t5 = merge("text_encoder")
        return Networks(encode_text=t5, encode_image=lambda x: x.astype(jnp.float32), denoise=merge("transformer"),
                        encode_caption=lambda ids: jax.lax.stop_gradient(t5(ids)))

    def masked(tree):
        rows = (jnp.arange(tree["text_encoder"]["embedding"].shape[0]) == MASK_ID)[:, None]
        return dict(tree, text_encoder={"embedding": tree["text_encoder"]["embedding"] * rows})

    @jax.jit
    def step(state, frozen, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        noised = corrupt(batch, rng, loss_cfg, batch["t2i"]["image"].shape[1:])

        def loss_fn(p):
            li, lt = per_example_losses(networks(p, frozen), batch, noised, loss_cfg)
            m = combine(jnp.mean(li), jnp.mean(lt), loss_cfg)
            return m["loss"], m

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = plan.tx.update(masked(grads), state["opt_state"], params)
        new_params = optax.apply_updates(params, masked(updates))
        ema = jax.tree.map(lambda e, p: e * 0.9 + p * 0.1, state["ema"], new_params)
        return dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state, ema=ema), metrics

    return step


def test_mask_row_step_equals_the_full_table_formulation(single):
    """T5's mask row is a (1, d_model) float32 parameter with its own Adam moments and EMA, the table frozen.
    Three steps of this step (T5's two row sets in one pass over its layers) equal the old formulation
    (`_reference_step`: the whole table in the train state behind an update mask) to float tolerance: losses,
    params, moments and EMA; the rest of the table never moves, and folding the row back gives the old table."""
    plan, step, _ = single
    state, frozen = plan.init_fn()
    table = frozen["text_encoder"]["embedding"]
    assert set(state["params"]["text_encoder"]) == {"mask_row"} and state["params"]["text_encoder"]["mask_row"].shape \
        == (1, 32) and state["opt_state"][1][0].mu["text_encoder"]["mask_row"].shape == (1, 32)
    np.testing.assert_array_equal(np.asarray(state["params"]["text_encoder"]["mask_row"])[0], np.asarray(table)[MASK_ID])
    # The old layout of the same weights: T5's table (and its moments / EMA) in the train state.
    move = lambda tree: dict(tree, text_encoder={"embedding": table})  # noqa: E731
    old = jax.tree.map(jnp.copy, dict(state, params=move(state["params"]), ema=move(state["ema"]),  # step donates
                                      opt_state=plan.tx.init(move(state["params"]))))
    frozen_old = dict(frozen, text_encoder={k: v for k, v in frozen["text_encoder"].items() if k != "embedding"})
    reference = _reference_step(plan, LOSS)
    for i in range(3):
        batch = tiny_batch(BATCH, seed=i)
        state, m = step(state, frozen, batch)
        old, m_old = reference(old, frozen_old, jax.tree.map(jnp.asarray, batch))
        np.testing.assert_allclose(float(m["loss"]), float(m_old["loss"]), rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)  # noqa: E731
    jax.tree.map(close, state["params"]["transformer"], old["params"]["transformer"])
    jax.tree.map(close, state["ema"]["transformer"], old["ema"]["transformer"])
    row, old_table = state["params"]["text_encoder"]["mask_row"], old["params"]["text_encoder"]["embedding"]
    assert np.abs(np.asarray(row) - np.asarray(table)[MASK_ID]).max() > 1e-4  # the row did move
    close(row[0], old_table[MASK_ID])
    close(state["ema"]["text_encoder"]["mask_row"][0], old["ema"]["text_encoder"]["embedding"][MASK_ID])
    adam, adam_old = state["opt_state"][1][0], old["opt_state"][1][0]
    close(adam.mu["text_encoder"]["mask_row"][0], adam_old.mu["text_encoder"]["embedding"][MASK_ID])
    close(adam.nu["text_encoder"]["mask_row"][0], adam_old.nu["text_encoder"]["embedding"][MASK_ID])
    np.testing.assert_array_equal(np.delete(np.asarray(old_table), MASK_ID, 0), np.delete(np.asarray(table), MASK_ID, 0))
    folded = plan.split.network_states(state["ema"], frozen)["text_encoder"]["embedding"]
    close(folded, old["ema"]["text_encoder"]["embedding"])


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
