"""MMDiT: parity with the PyTorch reference (diffusers SD3 parts), key map coverage, scan/remat, size."""
from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

import dual_diffusion  # noqa: F401  (flax config before any module is built)
import jax
import jax.numpy as jnp
from flax import nnx

from dual_diffusion.convert.keymap import export_torch_state, load_torch_state
from dual_diffusion.convert.mmdit_keys import mmdit_rules, sd3_init_plan
from dual_diffusion.models.configs import MMDiTConfig, Runtime, mmdit_from_diffusers, mmdit_to_diffusers
from dual_diffusion.models.embeddings import sincos_2d_grid
from dual_diffusion.models.mmdit import MMDiT, abstract_mmdit, count_params, init_mmdit
from dual_diffusion.sharding import DEFAULT_RULES, make_mesh, state_shardings

torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench"
VOCAB = 64
VARIANTS = {
    "plain": {},
    "qk_norm": {"qk_norm": "rms_norm"},
    "dual_attention": {"qk_norm": "rms_norm", "dual_attention_layers": (0, 1)},
}


def _ref_module():
    if not (BENCH / "ref_ddit.py").exists():
        pytest.skip(f"PyTorch reference {BENCH / 'ref_ddit.py'} not found (shared/bench beside the repo)")
    pytest.importorskip("diffusers")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("ref_ddit")


def _torch_cfg(variant: str) -> dict:
    ref = _ref_module()
    return dict(ref.TINY, **VARIANTS[variant])


def _build_ref(variant: str):
    ref = _ref_module()
    torch.manual_seed(0)
    model = ref.build_ddit(_torch_cfg(variant), VOCAB).eval()
    # Diffusers initialises adaLN linears like any Linear; the null embedding is random too.
    return ref, model


def _our_cfg(variant: str) -> MMDiTConfig:
    return mmdit_from_diffusers(_torch_cfg(variant), VOCAB)


def _state_numpy(model) -> dict:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _inputs(seed=0, batch=2, height=16, width=12, text_len=7):
    """NHWC latents (non-square: the position crop differs per axis), T5-like states, timesteps."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((batch, height, width, 4)).astype(np.float32)
    text = rng.standard_normal((batch, text_len, 32)).astype(np.float32)
    t = np.array([250.5, 900.0][:batch], np.float32)
    return latents, text, t


def _loaded(cfg: MMDiTConfig, runtime: Runtime, state_dict) -> MMDiT:
    """A model holding the given PyTorch weights, built abstractly (no eager init)."""
    model = abstract_mmdit(cfg, runtime)
    load_torch_state(model, state_dict, mmdit_rules(cfg))
    return model


def _rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_keymap_covers_both_sides(variant):
    _, ref_model = _build_ref(variant)
    cfg = _our_cfg(variant)
    rules = mmdit_rules(cfg)
    sources = [r.source for r in rules]
    targets = [r.target for r in rules]
    assert len(set(sources)) == len(sources) and len(set(targets)) == len(targets)
    assert set(sources) == set(ref_model.state_dict())
    model = abstract_mmdit(cfg)
    assert set(targets) == {path for path, _ in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_pytorch_reference(variant, record_property):
    ref, ref_model = _build_ref(variant)
    cfg = _our_cfg(variant)
    model = _loaded(cfg, Runtime(attention_impl="xla"), _state_numpy(ref_model))
    latents, text, t = _inputs()
    with torch.no_grad():
        v_ref, logits_ref = ref.ddit_forward(ref_model, torch.from_numpy(latents).permute(0, 3, 1, 2),
                                             torch.from_numpy(text), torch.from_numpy(t))
        _, logits_txt_ref = ref.ddit_forward(ref_model, None, torch.from_numpy(text), torch.from_numpy(t))
    v, logits = model(jnp.asarray(latents), jnp.asarray(text), jnp.asarray(t))
    v_none, logits_txt = model(None, jnp.asarray(text), jnp.asarray(t))
    assert v_none is None
    errs = {
        "velocity": _rel_err(v, v_ref.permute(0, 2, 3, 1).numpy()),
        "logits": _rel_err(logits, logits_ref.numpy()),
        "logits_text_only": _rel_err(logits_txt, logits_txt_ref.numpy()),
    }
    for name, err in errs.items():
        record_property(f"{variant}_{name}_rel_err", err)
    print(variant, errs)
    assert max(errs.values()) <= 1e-4, errs


def test_position_grid_matches_reference_buffer():
    _, ref_model = _build_ref("plain")
    cfg = _our_cfg("plain")
    grid = sincos_2d_grid(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
    np.testing.assert_array_equal(grid[None], ref_model.pos_embed.pos_embed.numpy())


def test_export_round_trips_bit_for_bit():
    _, ref_model = _build_ref("dual_attention")
    cfg = _our_cfg("dual_attention")
    sd = _state_numpy(ref_model)
    model = _loaded(cfg, Runtime(), sd)
    out = export_torch_state(model, mmdit_rules(cfg))
    assert set(out) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(out[k], sd[k], err_msg=k)


def test_load_names_bad_shape():
    _, ref_model = _build_ref("plain")
    cfg = _our_cfg("plain")
    model = abstract_mmdit(cfg)
    sd = _state_numpy(ref_model)
    sd["context_embedder.weight"] = sd["context_embedder.weight"][:, :5]
    with pytest.raises(ValueError, match="context_embedder.weight"):
        load_torch_state(model, sd, mmdit_rules(cfg))


def _scan_setup(remat: str):
    """Loop and scan graphdefs of one 4-layer model with random weights: runs of two dual-attention
    blocks (0-1) and two plain blocks (2-3)."""
    cfg = dataclasses.replace(_our_cfg("dual_attention"), num_layers=4, dual_attention_layers=(0, 1))
    ref = _ref_module()
    torch.manual_seed(1)
    sd = _state_numpy(ref.build_ddit(dict(_torch_cfg("dual_attention"), num_layers=4), VOCAB))
    model = abstract_mmdit(cfg, Runtime(attention_impl="xla"))
    load_torch_state(model, sd, mmdit_rules(cfg))
    graphdef, state = nnx.split(model)
    scan = nnx.graphdef(abstract_mmdit(cfg, Runtime(attention_impl="xla", scan_layers=True, remat_policy=remat)))
    latents, text, t = _inputs()
    forward = lambda g, s: nnx.merge(g, s)(latents, text, t)
    return graphdef, scan, state, forward


def test_scan_matches_loop():
    # remat does not change forward values; "dots_no_batch" exercises the checkpointed scan body.
    graphdef, scan_graphdef, state, forward = _scan_setup("dots_no_batch")
    run = jax.jit(forward, static_argnums=0)
    (v1, l1), (v2, l2) = run(graphdef, state), run(scan_graphdef, state)
    np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(v1))))
    np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(l1))))


@pytest.mark.slow
def test_scan_with_remat_gradients_match_loop():
    graphdef, scan_graphdef, state, forward = _scan_setup("dots")

    def loss(g, s):
        v, logits = forward(g, s)
        return jnp.mean(v ** 2) + jnp.mean(logits ** 2)

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    g1, g2 = grad(graphdef, state), grad(scan_graphdef, state)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g2)):
        a, b = np.asarray(a[...]), np.asarray(b[...])
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(float(np.max(np.abs(a))), 1e-6),
                                   err_msg=str(path))


def test_bfloat16_runtime_stays_close():
    ref, ref_model = _build_ref("qk_norm")
    cfg = _our_cfg("qk_norm")
    sd = _state_numpy(ref_model)
    f32 = _loaded(cfg, Runtime(attention_impl="xla"), sd)
    bf16 = _loaded(cfg, Runtime(dtype="bfloat16"), sd)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    latents, text, t = _inputs()
    v32, l32 = f32(latents, text, t)
    v16, l16 = bf16(latents, text, t)
    assert v16.dtype == jnp.float32 and l16.dtype == jnp.float32
    errs = {"velocity": _rel_err(v16, np.asarray(v32)), "logits": _rel_err(l16, np.asarray(l32))}
    print("bf16 vs f32", errs)
    assert max(errs.values()) < 2e-2, errs


def test_logical_names_shard_on_a_mesh():
    cfg = _our_cfg("dual_attention")
    state = nnx.state(abstract_mmdit(cfg))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    shardings = state_shardings(state, mesh, DEFAULT_RULES)
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        assert var.get_metadata().get("out_sharding") is not None, path
    sharded = dict(nnx.to_flat_state(shardings))
    assert sharded[("text_out_proj", "kernel")].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sharded[("blocks", 0, "img_mlp", "fc2", "kernel")].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    with pytest.raises(ValueError, match="remat_policy"):
        abstract_mmdit(cfg, Runtime(remat_policy="everything"))


def test_fresh_init_is_identity_on_blocks_and_zero_heads():
    cfg = _our_cfg("plain")
    model = init_mmdit(cfg)
    latents, text, t = _inputs()
    v, logits = model(latents, text, t)
    np.testing.assert_array_equal(v, 0.0)
    np.testing.assert_array_equal(logits, 0.0)
    embd = np.asarray(model.null_image_embd[...])
    assert embd.shape == (1, cfg.num_null_image_tokens, cfg.hidden_size)


def test_full_size_parameter_count():
    # REFERENCE.md: 2,102,856,100 with the T5 vocabulary; the position grid is a buffer, not counted.
    model = abstract_mmdit(MMDiTConfig(vocab_size=32100))
    assert count_params(model) == 2_102_856_100
    assert model.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sd3_init_plan(variant):
    _ref_module()
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    plain = SD3Transformer2DModel(**_torch_cfg(variant))
    sd = _state_numpy(plain)
    cfg = _our_cfg(variant)
    used, new, dropped = sd3_init_plan(cfg, sd)
    last = cfg.num_layers - 1
    assert {r.source for r in used} | set(dropped) == set(sd)
    assert sorted(dropped) == sorted(k for k in sd if k.startswith(
        ("time_text_embed.text_embedder.", f"transformer_blocks.{last}.norm1_context.linear.")))
    assert set(new) == {("text_out_proj", "kernel"), ("text_out_proj", "bias"), ("null_image_embd",)} | {
        ("blocks", last) + rest for rest in [
            ("txt_mod", "kernel"), ("txt_mod", "bias"), ("txt_out", "kernel"), ("txt_out", "bias"),
            ("txt_mlp", "fc1", "kernel"), ("txt_mlp", "fc1", "bias"),
            ("txt_mlp", "fc2", "kernel"), ("txt_mlp", "fc2", "bias")]}
    model = abstract_mmdit(cfg)
    load_torch_state(model, sd, used, strict=False, allow_missing=new)
    np.testing.assert_array_equal(np.asarray(model.image_out_proj.kernel[...]), sd["proj_out.weight"].T)
    with pytest.raises(ValueError, match="no place"):
        sd3_init_plan(dataclasses.replace(cfg, num_layers=cfg.num_layers - 1), sd)


def test_text_position_table_breaks_the_all_mask_symmetry():
    """Identical text states at every position (an all-[MASK] caption under a position-free encoder) give
    identical logits per position without the table, distinct ones with it; the table exports under its
    own key and loads back bit for bit, and the release layout (table off) is unchanged."""
    base = dataclasses.replace(_our_cfg("plain"), text_pos_embed_len=9)
    latents, _, t = _inputs()
    text = np.broadcast_to(np.random.default_rng(3).standard_normal((2, 1, 32)), (2, 7, 32)).astype(np.float32)

    def spread(cfg):
        model = init_mmdit(cfg, Runtime(attention_impl="xla"), seed=1)
        graphdef, state = nnx.split(model)
        # Non-zero heads and modulations, so the logits depend on the text stream.
        state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), state)
        model = nnx.merge(graphdef, state)
        _, logits = model(latents, text, t)
        return float(np.max(np.std(np.asarray(logits), axis=1))), model

    off, _ = spread(dataclasses.replace(base, text_pos_embed_len=0))
    on, model = spread(base)
    assert off < 1e-5 < 1e-2 < on
    rules = mmdit_rules(base)
    sd = export_torch_state(model, rules)
    assert sd["text_pos_embed"].shape == (1, 9, base.hidden_size)
    again = abstract_mmdit(base)
    load_torch_state(again, sd, rules)
    np.testing.assert_array_equal(np.asarray(again.text_pos_embed[...]), sd["text_pos_embed"])
    assert mmdit_from_diffusers(mmdit_to_diffusers(base), VOCAB) == base
    assert "text_pos_embed" not in {r.source for r in mmdit_rules(_our_cfg("plain"))}
    with pytest.raises(ValueError, match="text_pos_embed_len=9"):
        model(latents, np.zeros((2, 10, 32), np.float32), t)


def test_row_pickers_give_the_rows_of_the_full_outputs():
    """image_rows / text_rows run each head on chosen rows only: equal to slicing the full outputs, and on a
    mesh with activation sharding active (pinned batch-sharded streams) the numbers do not change."""
    cfg = _our_cfg("plain")
    model = init_mmdit(cfg, Runtime(attention_impl="xla"), seed=1)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), state)
    model = nnx.merge(graphdef, state)
    latents, text, t = _inputs()
    velocity, logits = model(latents, text, t)
    first, second = (lambda x: x[:1]), (lambda x: x[1:])
    v1, l2 = model(latents, text, t, image_rows=first, text_rows=second)
    np.testing.assert_allclose(v1, velocity[:1], atol=1e-6)
    np.testing.assert_allclose(l2, logits[1:], atol=1e-6)

    from dual_diffusion import sharding
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    with sharding.activation_sharding(mesh, DEFAULT_RULES):
        v_sh, l_sh = jax.jit(lambda a, b, c: model(a, b, c))(latents, text, t)
    np.testing.assert_allclose(v_sh, velocity, atol=1e-5)
    np.testing.assert_allclose(l_sh, logits, atol=1e-5)


def test_text_logits_over_a_fresh_image_cache_equal_the_full_forward():
    """MMDiT.text_logits (text tokens only, over the image K/V of logits_and_image_kv) equals __call__'s
    logits for the same text, with scan_layers (a lone SD3.5 dual-attention block, then a scanned run of
    two) and qk-norm; with other text the cache is stale and the logits move (the approximation is real)."""
    cfg = dataclasses.replace(_our_cfg("dual_attention"), num_layers=3, dual_attention_layers=(0,))
    model = init_mmdit(cfg, Runtime(attention_impl="xla", scan_layers=True), seed=1)
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape, x.dtype), state)
    latents, text, t = _inputs()
    other = np.random.default_rng(7).standard_normal(text.shape).astype(np.float32)

    @jax.jit
    def run(state):
        m = nnx.merge(graphdef, state)
        _, full = m(latents, text, t)
        logits, image_kv = m.logits_and_image_kv(latents, text, t)
        return full, logits, m.text_logits(text, t, image_kv), image_kv, m(latents, other, t)[1], \
            m.text_logits(other, t, image_kv)

    full, logits, cached, image_kv, other_full, other_cached = run(state)
    n, scale = (16 // 2) * (12 // 2), float(np.max(np.abs(full)))
    assert image_kv.k.shape == image_kv.v.shape == (3, 2, n, cfg.num_attention_heads, cfg.attention_head_dim)
    np.testing.assert_allclose(logits, full, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5 * scale)
    assert float(np.max(np.abs(np.asarray(other_cached) - np.asarray(other_full)))) > 1e-4 * scale
