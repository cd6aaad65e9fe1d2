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


def test_only_mask_row_of_t5_trains_and_ema_follows(single):
    """The mask row is its own (1, d_model) float32 parameter with Adam moments and an EMA; T5's table is frozen
    (the trainer's samples see the row folded back into it)."""
    plan, step, batch = single
    state, frozen = plan.init_fn()
    assert set(state["params"]["text_encoder"]) == {"mask_row"} and state["params"]["text_encoder"]["mask_row"].shape \
        == (1, 32)
    assert state["opt_state"][1][0].mu["text_encoder"]["mask_row"].shape == (1, 32)
    table = np.asarray(frozen["text_encoder"]["embedding"])
    row0 = np.asarray(state["params"]["text_encoder"]["mask_row"])
    np.testing.assert_array_equal(row0[0], table[MASK_ID])
    mm0 = jax.tree.map(np.asarray, state["params"]["transformer"])
    for i in range(2):
        state, m = step(state, frozen, tiny_batch(BATCH, seed=i))
        assert np.isfinite(float(m["loss"])) and bool(m["finite"])
    row1 = np.asarray(state["params"]["text_encoder"]["mask_row"])
    assert np.abs(row1 - row0).max() > 0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"]["transformer"], mm0)
    assert max(jax.tree.leaves(moved)) > 0
    assert int(state["step"]) == 2 and int(state["nonfinite"]) == 0
    # EMA (decay 0.9) lies strictly between the init and the params after two updates.
    e = np.asarray(state["ema"]["text_encoder"]["mask_row"])
    assert 0 < np.abs(e - row0).max() < np.abs(row1 - row0).max()
    folded = np.asarray(plan.split.network_states(state["ema"], frozen)["text_encoder"]["embedding"])
    np.testing.assert_array_equal(folded[MASK_ID], e[0])
    np.testing.assert_array_equal(np.delete(folded, MASK_ID, 0), np.delete(table, MASK_ID, 0))


def _reference_step(plan, loss_cfg):
    """The step as it was before the mask row was a parameter of its own: T5's whole table trains behind an
    update mask (its gradient and update multiplied by the one-hot mask row), captions through a
    stop_gradient T5, T5 called once per half. Kept here to prove the new layout changes no result."""
    import optax
    from flax import nnx
    from flax.nnx import traversals

    from dual_diffusion.training.loss import Networks, combine, corrupt, per_example_losses

    embed = plan.split.embed_path
    mask_row = plan.split.trains_mask_row

    def networks(params, frozen):
        flat = lambda tree: traversals.flatten_mapping(tree or {})  # noqa: E731
        merge = lambda name: nnx.merge(plan.split.graphdefs[name], traversals.unflatten_mapping(  # noqa: E731
            {**flat(frozen[name]), **flat(params.get(name))}))
        t5 = merge("text_encoder")
        caption = (lambda ids: jax.lax.stop_gradient(t5(ids))) if mask_row else t5
        return Networks(encode_text=t5, encode_image=lambda x: x.astype(jnp.float32), denoise=merge("transformer"),
                        encode_caption=caption)

    def one_hot(params):
        rows = (jnp.arange(params["text_encoder"][embed[0]].shape[0]) == MASK_ID)[:, None]
        return {k: jax.tree.map(jnp.ones_like, v) if k != "text_encoder" or not mask_row
                else {embed[0]: rows.astype(jnp.float32)} for k, v in params.items()}

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
        mask = one_hot(params)
        grads = jax.tree.map(jnp.multiply, grads, mask)
        updates, opt_state = plan.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, jax.tree.map(jnp.multiply, updates, mask))
        ema = jax.tree.map(lambda e, p: e * 0.9 + p * 0.1, state["ema"], new_params)
        return dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state, ema=ema), metrics

    return step


@pytest.mark.parametrize("trainable", ["mask_row", "all"])
def test_step_equals_the_full_table_formulation(trainable):
    """Three steps of the new step (mask row apart, T5's two row sets in one pass over its layers, kernels cast
    on their shard) equal the old formulation (`_reference_step`) to float tolerance: losses, params, Adam
    moments and EMA; "all" is the demo's layout (every T5 weight trains, float32)."""
    config = tiny_model_config()
    config.model.text_encoder_trainable = trainable
    plan, step, _ = _setup((1, 1, 1), config=config)
    state, frozen = plan.init_fn()
    # The old layout of the same weights: T5's table (and its moments / EMA) in the train state.
    table = frozen["text_encoder"]["embedding"] if trainable == "mask_row" else None
    move = lambda tree, x: dict(tree, text_encoder={"embedding": x}) if table is not None else tree  # noqa: E731
    params_old = move(state["params"], table)
    old = jax.tree.map(jnp.copy, dict(state, params=params_old, ema=move(state["ema"], table),  # step donates state
                                      opt_state=plan.tx.init(params_old)))
    frozen_old = dict(frozen, text_encoder={k: v for k, v in frozen["text_encoder"].items()
                                            if table is None or k != "embedding"})
    reference = _reference_step(plan, LOSS)
    for i in range(3):
        batch = tiny_batch(BATCH, seed=i)
        state, m = step(state, frozen, batch)
        old, m_old = reference(old, frozen_old, jax.tree.map(jnp.asarray, batch))
        np.testing.assert_allclose(float(m["loss"]), float(m_old["loss"]), rtol=1e-5)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)  # noqa: E731
    jax.tree.map(close, state["params"]["transformer"], old["params"]["transformer"])
    jax.tree.map(close, state["ema"]["transformer"], old["ema"]["transformer"])
    if trainable == "all":
        jax.tree.map(close, state["params"]["text_encoder"], old["params"]["text_encoder"])
        return
    new_row, old_table = state["params"]["text_encoder"]["mask_row"], old["params"]["text_encoder"]["embedding"]
    assert np.abs(np.asarray(new_row) - np.asarray(table)[MASK_ID]).max() > 1e-4  # the row did move
    close(new_row[0], old_table[MASK_ID])
    close(state["ema"]["text_encoder"]["mask_row"][0], old["ema"]["text_encoder"]["embedding"][MASK_ID])
    adam, adam_old = state["opt_state"][1][0], old["opt_state"][1][0]
    close(adam.mu["text_encoder"]["mask_row"][0], adam_old.mu["text_encoder"]["embedding"][MASK_ID])
    close(adam.nu["text_encoder"]["mask_row"][0], adam_old.nu["text_encoder"]["embedding"][MASK_ID])
    np.testing.assert_array_equal(np.delete(np.asarray(old_table), MASK_ID, 0), np.delete(np.asarray(table), MASK_ID, 0))


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
