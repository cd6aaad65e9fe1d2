"""T5 encoder: parity with transformers' T5EncoderModel, key map coverage, scan == loop, size."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dual_diffusion  # noqa: F401  (flax config)
from dual_diffusion.convert.keymap import export_torch_state, load_torch_state
from dual_diffusion.convert.t5_keys import t5_rules
from dual_diffusion.models.configs import Runtime, T5Config
from dual_diffusion.models.t5 import T5Encoder, relative_position_buckets
from dual_diffusion.models.layers import read_rows

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


def _flat_paths(model):
    return {tuple(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _reference(cfg: T5Config, seed=0):
    """A random transformers T5EncoderModel; norms and position table randomized too."""
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, feed_forward_proj=cfg.feed_forward_proj, is_encoder_decoder=False,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
    return ref.eval()


def _ours(cfg: T5Config, ref, runtime=Runtime()):
    model = T5Encoder(cfg, runtime, rngs=nnx.Rngs(1))
    state = {k: v.numpy() for k, v in ref.state_dict().items()}
    return load_torch_state(model, state, t5_rules(cfg))


@nnx.jit
def _apply(model, ids, mask):
    return model(ids, mask)


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("proj", ["gated-gelu", "relu"])
def test_rules_match_model_and_torch_keys(proj, tmp_path):
    cfg = dataclasses.replace(TINY, feed_forward_proj=proj)
    rules = t5_rules(cfg)
    model = T5Encoder(cfg, rngs=nnx.Rngs(0))
    targets = [r.target for r in rules]
    assert len(targets) == len(set(targets)) and set(targets) == _flat_paths(model)

    ref = _reference(cfg)
    names = {r.source for r in rules} | {a for r in rules for a in r.aliases}
    assert names == set(ref.state_dict())
    # What save_pretrained writes: every rule finds its source or an alias, nothing else is there.
    from safetensors.numpy import load_file

    ref.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert set(saved) <= names
    assert all(any(k in saved for k in (r.source, *r.aliases)) for r in rules)
    loaded = load_torch_state(T5Encoder(cfg, rngs=nnx.Rngs(2)), saved, rules)
    exported = export_torch_state(loaded, rules)
    for key, value in ref.state_dict().items():
        np.testing.assert_array_equal(exported.get(key, exported["shared.weight"]), value.numpy(), err_msg=key)


def test_load_errors_name_the_key():
    rules = t5_rules(TINY)
    state = {k: v.numpy() for k, v in _reference(TINY).state_dict().items()}
    model = T5Encoder(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="final_layer_norm"):
        load_torch_state(model, {k: v for k, v in state.items() if "final" not in k}, rules)
    with pytest.raises(KeyError, match="extra.weight"):
        load_torch_state(model, {**state, "extra.weight": np.zeros(1)}, rules)
    bad = dict(state, **{"encoder.block.1.layer.0.SelfAttention.q.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"block\.1\.layer\.0\.SelfAttention\.q\.weight"):
        load_torch_state(model, bad, rules)


def test_relative_position_buckets_match_transformers():
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for q_len, k_len, buckets, max_distance in [(300, 300, 32, 128), (160, 160, 16, 20), (7, 50, 8, 16)]:
        rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
        ref = bucket(rel, bidirectional=True, num_buckets=buckets, max_distance=max_distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(q_len, k_len, buckets, max_distance), ref)


def _inputs(cfg, batch, length, seed=0):
    gen = np.random.default_rng(seed)
    ids = gen.integers(0, cfg.vocab_size, (batch, length))
    mask = np.ones((batch, length), np.int64)
    for b in range(1, batch):  # right padding of varied lengths; row 0 unpadded
        mask[b, gen.integers(1, length):] = 0
    return ids, mask


@pytest.mark.parametrize("cfg,length", [
    (TINY, 12),
    (dataclasses.replace(TINY, feed_forward_proj="relu"), 12),
    # Longer than max_distance: the logarithmic and saturated buckets are exercised.
    (dataclasses.replace(TINY, relative_attention_num_buckets=16, relative_attention_max_distance=20), 160),
])
@pytest.mark.parametrize("use_mask", [False, True])
def test_parity_with_transformers(cfg, length, use_mask):
    ref = _reference(cfg)
    ids, mask = _inputs(cfg, batch=3, length=length)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids),
                       attention_mask=torch.from_numpy(mask) if use_mask else None).last_hidden_state.numpy()
    model = _ours(cfg, ref)
    got = _apply(model, jnp.asarray(ids), jnp.asarray(mask) if use_mask else None)
    assert got.dtype == jnp.float32 and got.shape == expected.shape
    assert _rel_err(got, expected) <= 1e-4, _rel_err(got, expected)


def test_long_sequence_with_default_max_distance():
    """L=160 > max_distance=128 with T5's own bucket settings at tiny width."""
    ref = _reference(TINY)
    ids, mask = _inputs(TINY, batch=2, length=160, seed=1)
    with torch.no_grad():
        expected = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    got = _apply(_ours(TINY, ref), jnp.asarray(ids), jnp.asarray(mask))
    assert _rel_err(got, expected.numpy()) <= 1e-4


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scan_equals_loop(remat):
    """Scanned layers (optionally rematerialized) == the plain loop, in values and gradients."""
    cfg = dataclasses.replace(TINY, num_layers=3)
    ids, mask = _inputs(cfg, batch=2, length=10)
    loop = T5Encoder(cfg, Runtime(), rngs=nnx.Rngs(3))
    scan = T5Encoder(cfg, Runtime(scan_layers=True, remat_policy=remat), rngs=nnx.Rngs(3))
    assert _flat_paths(loop) == _flat_paths(scan)
    np.testing.assert_allclose(_apply(scan, ids, mask), _apply(loop, ids, mask), rtol=1e-6, atol=1e-6)

    # Gradients reach the embedding (the trained mask row) identically.
    @nnx.jit
    def grad(model):
        return nnx.grad(lambda m: jnp.sum(m(jnp.asarray(ids), jnp.asarray(mask)) ** 2))(model)

    g_loop, g_scan = grad(loop), grad(scan)
    np.testing.assert_allclose(g_scan["embedding"][...], g_loop["embedding"][...], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_scan["layers"][2]["wo"]["kernel"][...], g_loop["layers"][2]["wo"]["kernel"][...],
                               rtol=1e-5, atol=1e-5)


def test_mask_row_and_two_row_sets_in_one_pass():
    """The mask row passed apart reads like the row folded into the table; encode_two gives both sets' hidden
    states in one pass over the layers, the first without a gradient, the second's mask-row gradient unchanged;
    with both sets differentiated every weight's gradient equals that of two calls."""
    from dual_diffusion.models.t5 import fold_mask_row

    cfg = dataclasses.replace(TINY, num_layers=2)
    model = T5Encoder(cfg, Runtime(scan_layers=True, remat_policy="dots_no_batch"), rngs=nnx.Rngs(4))
    mask_id = cfg.vocab_size - 1
    rng = np.random.default_rng(0)
    captions = jnp.asarray(rng.integers(2, mask_id, (2, 10)), jnp.int32)
    noisy = jnp.asarray(np.where(rng.random((2, 10)) < 0.5, mask_id, rng.integers(2, mask_id, (2, 10))), jnp.int32)
    row = jnp.asarray(rng.normal(size=(1, cfg.d_model)), jnp.float32)
    graphdef, state = nnx.split(model)
    folded = nnx.merge(graphdef, {**nnx.to_pure_dict(state),
                                  "embedding": fold_mask_row(model.embedding[...], row, mask_id)})
    np.testing.assert_allclose(model(noisy, mask_row_1xD=row, mask_id=mask_id), folded(noisy), rtol=1e-6, atol=1e-6)

    def one_pass(row):
        a, b = model.encode_two(captions, noisy, mask_row_1xD=row, mask_id=mask_id)
        return jnp.sum(a ** 2) + jnp.sum(jnp.sin(b)), (a, b)

    def two_calls(row):
        a = jax.lax.stop_gradient(model(captions, mask_row_1xD=row, mask_id=mask_id))
        b = model(noisy, mask_row_1xD=row, mask_id=mask_id)
        return jnp.sum(a ** 2) + jnp.sum(jnp.sin(b)), (a, b)

    (_, got), g = jax.jit(jax.value_and_grad(one_pass, has_aux=True))(row)
    (_, want), g_want = jax.jit(jax.value_and_grad(two_calls, has_aux=True))(row)
    for x, y in zip(got, want):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(g).max()) > 0

    # Every weight training (the demo): both sets differentiated, the same weight gradients as two calls.
    def weight_grads(both):
        def loss(m):
            a, b = (m.encode_two(captions, noisy, differentiate_frozen=True) if both else (m(captions), m(noisy)))
            return jnp.sum(a ** 2) + jnp.sum(jnp.sin(b))
        return nnx.jit(nnx.grad(loss))(model)

    g_one, g_two = weight_grads(True), weight_grads(False)
    for name in ("embedding", "relative_attention_bias"):
        np.testing.assert_allclose(g_one[name][...], g_two[name][...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_one["layers"][1]["wi_0"]["kernel"][...], g_two["layers"][1]["wi_0"]["kernel"][...],
                               rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_tracks_float32():
    ref = _reference(TINY)
    ids, mask = _inputs(TINY, batch=2, length=12)
    f32 = _apply(_ours(TINY, ref), ids, mask)
    bf16_model = _ours(TINY, ref, Runtime(dtype="bfloat16"))
    bf16 = _apply(bf16_model, ids, mask)
    assert bf16.dtype == jnp.float32 and bf16_model.embedding[...].dtype == jnp.float32
    assert _rel_err(bf16, f32) < 5e-2


def test_full_size_parameter_count():
    model = nnx.eval_shape(lambda: T5Encoder(T5Config(), rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == 4_762_310_656
    assert {r.target for r in t5_rules(T5Config())} == _flat_paths(model)


def test_sharded_forward_matches_unsharded():
    from dual_diffusion.sharding import DEFAULT_RULES, make_mesh, state_shardings

    model = T5Encoder(TINY, rngs=nnx.Rngs(4))
    ids, mask = _inputs(TINY, batch=4, length=8)
    expected = _apply(model, ids, mask)
    graphdef, state = nnx.split(model)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = state_shardings(state, mesh, DEFAULT_RULES)
    assert shardings["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    state = jax.device_put(state, shardings)
    got = jax.jit(lambda s, i, a: nnx.merge(graphdef, s)(i, a))(state, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_window_over_the_cache_of_the_same_ids_equals_the_full_encoding():
    """encode_with_kv gives __call__'s states; encode_window of W positions per row (own start per row, one at
    the row's end) over that cache equals the full encoding there: the window's queries see all L keys with
    the relative position bias of their true positions (long rows: log and saturated buckets)."""
    cfg = dataclasses.replace(TINY, relative_attention_num_buckets=16, relative_attention_max_distance=20)
    ids, _ = _inputs(cfg, batch=3, length=40)
    model = T5Encoder(cfg, Runtime(), rngs=nnx.Rngs(3))  # unscanned layers, as inference runs them
    starts, W = jnp.array([0, 17, 32]), 8

    @nnx.jit
    def run(model, ids):
        hidden, kv = model.encode_with_kv(ids)
        window = read_rows(ids, starts, W)
        return model(ids), hidden, kv, model.encode_window(window, starts, kv)

    full, hidden, kv, window = run(model, jnp.asarray(ids))
    assert kv[0].shape == kv[1].shape == (cfg.num_layers, 3, 40, cfg.num_heads, cfg.d_kv)
    np.testing.assert_allclose(hidden, full, rtol=1e-6, atol=1e-6)
    want = np.stack([np.asarray(full)[b, s:s + W] for b, s in enumerate(np.asarray(starts))])
    np.testing.assert_allclose(window, want, rtol=1e-5, atol=1e-5)
